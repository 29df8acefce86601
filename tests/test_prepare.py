"`liver_seg.prepare.prepare` end to end on synthetic phantoms: counts, resume, atomicity, workers, CHAOS cases, errors."
import os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liver_seg.prepare import prepare
from liver_seg.io import LiverSegError, find_slice_pairs, read_image, read_mask, to_display
from liver_seg.synth import canonical_phantom, write_chaos_case, write_lits_case
from liver_seg.windows import gray_window

ROOT = Path(__file__).parents[1]
SHAPE = (96, 96, 24)


@pytest.fixture(scope='module')
def lits(tmp_path_factory):
    "Two LiTS-style phantom cases, segmentations in their own folder like the LiTS download."
    src = tmp_path_factory.mktemp('lits')
    for n, seed in ((0, 11), (5, 12)):
        write_lits_case(src/'volumes', n, shape=SHAPE, seed=seed)
    (src/'segmentations').mkdir()
    for p in (src/'volumes').glob('segmentation-*'): p.rename(src/'segmentations'/p.name)
    return src


def files(out):
    return {f"{d}/{p.name}": p.read_bytes() for d in ('images', 'masks') for p in sorted((out/d).iterdir())}


def test_one_image_and_mask_per_slice_with_exact_counts(lits, tmp_path):
    out = tmp_path/'out'
    df = pd.read_csv(prepare(lits, out, fmt='png', progress=False))
    assert list(df.columns) == ['case', 'slice', 'image', 'mask', 'liver_px', 'tumor_px']
    assert len(df) == 2*SHAPE[2] and sorted(df.case.unique()) == ['volume-0', 'volume-5']
    assert len(list((out/'images').iterdir())) == len(list((out/'masks').iterdir())) == len(df)
    for case, seed in (('volume-0', 11), ('volume-5', 12)):
        hu, lab, _ = canonical_phantom(shape=SHAPE, seed=seed)
        rows = df[df.case == case].sort_values('slice')
        assert rows.slice.tolist() == list(range(SHAPE[2]))
        assert rows.liver_px.sum() == (lab == 1).sum() > 0      # liver_px: label 1 only
        assert rows.tumor_px.sum() == (lab == 2).sum() > 0      # tumor_px: label 2
        for k in (0, 7, 13, 23):
            mask = read_mask(out/rows.iloc[k]['mask'])
            assert mask.shape == (SHAPE[1], SHAPE[0])           # full resolution, display orientation
            assert np.array_equal(mask, to_display(lab[:, :, k]))
            assert np.array_equal(read_image(out/rows.iloc[k].image), gray_window(to_display(hu[:, :, k])))  # the lits window
    pairs = find_slice_pairs(out)                                # the output is a slice folder liver_seg.io reads
    assert len(pairs) == len(df)


def test_rerun_restores_exactly_the_deleted_files(lits, tmp_path):
    for fmt in ('png', 'jpg'):
        out = tmp_path/fmt
        manifest = prepare(lits, out, fmt=fmt, every=2, progress=False)
        ref, ref_manifest = files(out), manifest.read_bytes()
        with pytest.raises(LiverSegError, match='manifest'):   # a finished export is kept
            prepare(lits, out, fmt=fmt, every=2, progress=False)
        manifest.unlink()                                       # as a killed run leaves it
        gone = [f'images/volume-0_0004.{fmt}', 'masks/volume-5_0010.png', f'images/volume-5_0022.{fmt}', 'masks/volume-5_0022.png']
        for g in gone: (out/g).unlink()
        mtimes = {p: p.stat().st_mtime_ns for d in ('images', 'masks') for p in (out/d).iterdir()}
        prepare(lits, out, fmt=fmt, every=2, progress=False)
        assert files(out) == ref and manifest.read_bytes() == ref_manifest
        touched = {f"{p.parent.name}/{p.name}" for d in ('images', 'masks') for p in (out/d).iterdir()
                   if mtimes.get(p) != p.stat().st_mtime_ns}
        assert touched == {f'images/volume-0_0004.{fmt}', 'masks/volume-0_0004.png', f'images/volume-5_0010.{fmt}',
                           'masks/volume-5_0010.png', f'images/volume-5_0022.{fmt}', 'masks/volume-5_0022.png'}


def test_workers_write_the_same_bytes(lits, tmp_path):
    one = prepare(lits, tmp_path/'w1', fmt='jpg', windows=('liver', 'custom'), progress=False)    # the seed's RGB channels
    two = prepare(lits, tmp_path/'w2', fmt='jpg', windows=('liver', 'custom'), workers=2, progress=False)
    assert files(tmp_path/'w1') == files(tmp_path/'w2')
    gray1, gray2 = (prepare(lits, tmp_path/f'g{w}', fmt='jpg', workers=w, progress=False) for w in (1, 2))  # the default
    assert files(tmp_path/'g1') == files(tmp_path/'g2') and gray1.read_bytes() == gray2.read_bytes()
    assert Image.open(tmp_path/'g2'/'images'/'volume-0_0012.jpg').mode == 'L'
    assert files(tmp_path/'w1') == files(tmp_path/'w2')
    assert one.read_bytes() == two.read_bytes()
    img = Image.open(tmp_path/'w2'/'images'/'volume-0_0012.jpg')
    assert img.format == 'JPEG' and img.mode == 'RGB' and img.size == (SHAPE[0], SHAPE[1])


def test_jpeg_is_the_seeds_save_jpg(lits, tmp_path):
    "The seed saved with fastai's save_jpg(quality=120): same file bytes as ours."
    import torch
    from fastai.medical.imaging import dicom_windows  # noqa: F401 (patches Tensor.save_jpg)
    out = tmp_path/'out'
    prepare(lits, out, fmt='jpg', windows=('liver', 'custom'), progress=False)
    hu, _, _ = canonical_phantom(shape=SHAPE, seed=11)
    for k in (3, 12):
        x = torch.from_numpy(np.ascontiguousarray(to_display(hu[:, :, k]), dtype=np.float32))
        x.save_jpg(tmp_path/'seed.jpg', [(150, 30), (200, 60)], quality=120)
        assert (tmp_path/'seed.jpg').read_bytes() == (out/'images'/f'volume-0_{k:04d}.jpg').read_bytes()


def test_chaos_cases(tmp_path):
    src = tmp_path/'chaos'
    write_chaos_case(src/'2', shape=(64, 56, 10), seed=21)
    write_chaos_case(src/'10', shape=(64, 56, 8), seed=22, mask_encoding='255')
    df = pd.read_csv(prepare(src, tmp_path/'out', fmt='png', progress=False))
    assert df.case.astype(str).unique().tolist() == ['2', '10']
    hu, lab, _ = canonical_phantom(shape=(64, 56, 10), seed=21)
    rows = df[df.case.astype(str) == '2']
    assert rows.liver_px.sum() == (lab == 1).sum() and rows.tumor_px.sum() == (lab == 2).sum() > 0
    assert np.array_equal(read_mask(tmp_path/'out'/'masks'/'2_0006.png'), to_display(lab[:, :, 6]))
    assert np.array_equal(read_image(tmp_path/'out'/'images'/'2_0006.png'), gray_window(to_display(hu[:, :, 6])))
    _, lab10, _ = canonical_phantom(shape=(64, 56, 8), seed=22)                 # liver-only masks: tumour counted as liver
    assert df[df.case.astype(str) == '10'].tumor_px.sum() == 0
    assert df[df.case.astype(str) == '10'].liver_px.sum() == (lab10 > 0).sum()
    one = pd.read_csv(prepare(src/'2', tmp_path/'single', progress=False))   # a single case folder
    assert len(one) == 10 and set(one.case.astype(str)) == {'2'}


def test_user_errors_name_the_file(lits, tmp_path):
    with pytest.raises(LiverSegError, match='no such file'):
        prepare(tmp_path/'missing', tmp_path/'o1', progress=False)
    (tmp_path/'empty').mkdir()
    with pytest.raises(LiverSegError, match='no volumes found'):
        prepare(tmp_path/'empty', tmp_path/'o2', progress=False)
    bad = tmp_path/'bad'
    write_lits_case(bad, 1, shape=(32, 32, 6), seed=1)
    write_lits_case(tmp_path/'other', 1, shape=(32, 32, 5), seed=1)
    shutil.copy(tmp_path/'other'/'segmentation-1.nii.gz', bad/'segmentation-1.nii.gz')
    with pytest.raises(LiverSegError, match=r'segmentation-1\.nii\.gz.*shape'):
        prepare(bad, tmp_path/'o3', progress=False)
    (bad/'segmentation-1.nii.gz').unlink()
    with pytest.raises(LiverSegError, match=r'volume-1\.nii\.gz.*no segmentation-1'):
        prepare(bad, tmp_path/'o4', progress=False)
    trunc = tmp_path/'trunc'
    write_lits_case(trunc, 2, shape=(32, 32, 6), seed=1)
    data = (trunc/'volume-2.nii.gz').read_bytes()
    (trunc/'volume-2.nii.gz').write_bytes(data[:len(data)//2])
    with pytest.raises(LiverSegError, match=r'volume-2\.nii\.gz'):
        prepare(trunc, tmp_path/'o5', progress=False)
    assert not (tmp_path/'o5'/'manifest.csv').exists()


def test_interrupted_export_with_other_windows_is_refused(lits, tmp_path):
    out = tmp_path/'out'
    prepare(lits, out, every=6, progress=False)
    (out/'manifest.csv').unlink()
    with pytest.raises(LiverSegError, match='windows'):
        prepare(lits, out, every=6, windows=('abdomen_soft', 'liver'), progress=False)
    prepare(lits, out, every=6, windows=('abdomen_soft', 'liver'), force=True, progress=False)
    assert (out/'manifest.csv').exists()


def test_killed_run_leaves_only_complete_files_and_resumes(tmp_path):
    src, out, ref = tmp_path/'src', tmp_path/'out', tmp_path/'ref'
    write_lits_case(src, 0, shape=(160, 160, 160), seed=3)
    code = textwrap.dedent(f"""
        from liver_seg.prepare import prepare
        prepare({str(src)!r}, {str(out)!r}, fmt='png', progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.Popen([sys.executable, '-c', code], env=env)
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        if (out/'images').is_dir() and len(list((out/'images').iterdir())) >= 8: break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL); proc.wait()
    if (out/'manifest.csv').exists(): pytest.skip("the export finished before it could be killed")
    written = [p for d in ('images', 'masks') for p in (out/d).iterdir() if not p.name.startswith('.')]
    assert 0 < len(written) < 2*160
    for p in written: Image.open(p).load()                       # every visible file is complete
    prepare(src, out, fmt='png', progress=False)                 # resumed without force
    assert not [p for d in ('images', 'masks') for p in (out/d).iterdir() if p.name.startswith('.')]
    prepare(src, ref, fmt='png', progress=False)
    assert files(out) == files(ref)
    assert (out/'manifest.csv').read_bytes() == (ref/'manifest.csv').read_bytes()


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([sys.executable, '-m', 'liver_seg', *map(str, args)], env=env, capture_output=True, text=True)


def test_cli_prepare(lits, tmp_path):
    out = tmp_path/'out'
    r = cli('prepare', lits, out, '--format', 'png', '--every', '4', '--workers', '2')
    assert r.returncode == 0, r.stderr
    assert str(out/'manifest.csv') in r.stdout
    df = pd.read_csv(out/'manifest.csv')
    assert len(df) == 2*6 and (out/'images'/'volume-5_0020.png').exists()
    r = cli('prepare', lits, out, '--format', 'png', '--every', '4')         # finished: kept without --force
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0
    assert str(out) in r.stderr and '--force' in r.stderr
    assert cli('prepare', lits, out, '--format', 'png', '--every', '4', '--force').returncode == 0
    r = cli('prepare', tmp_path/'nothing', tmp_path/'o2')
    assert r.returncode == 2 and str(tmp_path/'nothing') in r.stderr and 'Traceback' not in r.stderr
    r = cli('prepare', lits, tmp_path/'o3', '--windows', 'liver,nope')
    assert r.returncode == 2 and 'nope' in r.stderr and 'Traceback' not in r.stderr


def test_write_error_in_a_worker_is_one_line_and_leaves_nothing(lits, tmp_path):
    "A full disk hit inside a worker process: the LiverSegError crosses the process boundary intact."
    import resource

    def small_files():  # writes past 4 kB fail with EFBIG: prepare.json and the small masks fit, the JPEGs do not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    r = subprocess.run([sys.executable, '-m', 'liver_seg', 'prepare', str(lits), str(tmp_path/'out'), '--workers', '2'],
                       env=env, capture_output=True, preexec_fn=small_files)
    r.stderr = r.stderr.decode()  # not text=True, which turns the progress bar's carriage returns into newlines
    lines = [l.split('\r')[-1] for l in r.stderr.split('\n') if l.split('\r')[-1].strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert 'cannot write' in lines[0] and '.jpg' in lines[0] and 'Traceback' not in r.stderr
    assert not (tmp_path/'out').exists()
