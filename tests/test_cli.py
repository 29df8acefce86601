"End-to-end runs of the `liver-seg` command line on synthetic phantoms: prepare -> train -> predict (NIfTI, DICOM, slices) -> evaluate"
import math, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liver_seg.io import read_nifti, read_labels, read_dicom_series, find_slice_pairs
from liver_seg.synth import make_phantom, phantom_affine, write_lits_case, write_chaos_case, make_phantom_dataset
from liver_seg.train import PLANS, training_plan, resolve_precision

CLI = [sys.executable, '-c', 'import sys; from liver_seg.cli import main; sys.exit(main())']
PH = dict(shape=(64, 64, 12), spacing=(2.0, 2.0, 5.0))

def run(*args, ok=True):
    "Run `liver-seg ARGS` in a subprocess; check its exit status"
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=900)
    if ok: assert r.returncode == 0, f"liver-seg {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}"
    return r

@pytest.fixture(scope='module')
def flow(tmp_path_factory):
    "Phantoms, a prepared slice folder and a tiny trained model, made once for the module"
    tmp = tmp_path_factory.mktemp('flow')
    make_phantom_dataset(tmp/'lits', n_cases=3, kind='lits', seed=3, **PH)
    r = run('prepare', tmp/'lits', tmp/'slices', '--format', 'png')
    assert r.stdout.startswith('prepared 36 slices of 3 cases (') and 'manifest' in r.stdout
    r = run('train', tmp/'slices', '--out', tmp/'model', '--arch', 'resnet18', '--size', 64, '--epochs', 1,
            '--bs', 8, '--no-pretrained', '--valid-cases', 'volume-2', '-q')
    assert r.stdout == f"model folder: {tmp/'model'}\n"   # -q: no bars, no epoch table
    return tmp

def test_prepare_manifest_counts_every_voxel(flow):
    m = pd.read_csv(flow/'slices'/'manifest.csv')
    test_counts = {}
    for case in range(3):
        seg = read_labels(flow/'lits'/f'segmentation-{case}.nii.gz').array
        test_counts[f'volume-{case}'] = (int((seg == 1).sum()), int((seg == 2).sum()))
    got = m.groupby('case')[['liver_px', 'tumor_px']].sum()
    for case, (liver, tumor) in test_counts.items():
        assert tuple(got.loc[case]) == (liver, tumor)

def test_model_folder_is_complete(flow):
    "The default is coarse to fine: the model folder holds the fine stage and, in coarse/, the coarse stage"
    import json
    names = {p.name for p in (flow/'model').iterdir()}
    assert {'weights.safetensors', 'config.json', 'history.csv', 'learner.pkl', 'coarse'} <= names
    assert {'weights.safetensors', 'config.json'} <= {p.name for p in (flow/'model'/'coarse').iterdir()}
    cfg, coarse = (json.loads((flow/'model'/d/'config.json').read_text()) for d in ('.', 'coarse'))
    assert cfg['cascade']['coarse'] == 'coarse' and coarse['size'] == 64 and 'cascade' not in coarse
    plan = cfg['recipe']['plan']  # the CPU decides: light for fp32 (no bf16), standard with bf16
    assert plan == training_plan('auto', resolve_precision('auto', 'cpu')[0], 'cpu') and coarse['recipe']['plan'] == plan
    assert coarse['recipe']['epochs'] == PLANS[plan]['coarse_epochs']
    # the U-Net of the plan: the last block halved (RESULTS.md, session 10), or none and every decoder block halved (light, sessions 12 and 18)
    assert cfg['arch_kwargs'] == coarse['arch_kwargs'] == ({'bottle': True} if plan == 'standard' else {'last_cross': False, 'half_decoder': True})
    assert not any(p.name.startswith('.model') for p in flow.iterdir())  # the hidden coarse folder moved in
    assert list((flow/'model').rglob('*.int8.xml')) == []  # int8 graphs are opt-in (--quantize: tests/test_quantize.py)


def test_predict_needs_the_coarse_stage_and_engines_agree(flow, tmp_path):
    "Without coarse/ a coarse-to-fine model is refused by name; torch and OpenVINO f32 give the same labels (int8: tests/test_quantize.py)"
    import shutil
    vol, _ = write_lits_case(tmp_path, case_id=8, seed=12, **PH)
    a, b = tmp_path/'a.nii.gz', tmp_path/'b.nii.gz'
    run('predict', flow/'model', vol, a, '--engine', 'torch', '-q')
    run('predict', flow/'model', vol, b, '--engine', 'openvino', '-q')
    assert np.array_equal(read_labels(a).array, read_labels(b).array)
    half = tmp_path/'half'; shutil.copytree(flow/'model', half); shutil.rmtree(half/'coarse')
    r = run('predict', half, vol, tmp_path/'c.nii.gz', ok=False)
    assert r.returncode == 2 and f"{half/'coarse'}: a coarse-to-fine model needs its coarse stage" in r.stderr
    assert not (tmp_path/'c.nii.gz').exists()

def test_predict_nifti_keeps_geometry_and_evaluates(flow):
    "A held-out phantom with a non-identity affine predicts onto its own grid; evaluate prints and writes a table"
    vol, seg = write_lits_case(flow/'heldout', case_id=7, seed=11, **PH)
    src = read_nifti(vol)
    assert not np.allclose(src.affine[:3, :3], np.eye(3)) and np.abs(src.affine[:3, 3]).sum() > 0
    out = flow/'pred'/'prediction-7.nii.gz'
    (flow/'pred').mkdir()
    r = run('predict', flow/'model', vol, out, '--batch-size', 4)
    assert str(out) in r.stdout
    pred = read_labels(out)
    assert pred.shape == src.shape and pred.array.dtype == np.uint8
    assert set(np.unique(pred.array)) <= {0, 1, 2}
    np.testing.assert_array_equal(pred.affine, src.affine)
    import nibabel as nib
    a, b = nib.load(str(vol)).header, nib.load(str(out)).header
    np.testing.assert_allclose(a.get_qform(), b.get_qform()); np.testing.assert_allclose(a.get_sform(), b.get_sform())
    assert (int(a['qform_code']), int(a['sform_code'])) == (int(b['qform_code']), int(b['sform_code']))
    r = run('evaluate', out, seg, '--csv', flow/'metrics.csv')
    df = pd.read_csv(flow/'metrics.csv')
    assert len(df) == 1 and 'liver_dice' in df and 'tumor_hd95_mm' in df
    assert 0 <= df.liver_dice[0] <= 1 and math.isfinite(df.liver_volume_ml_gt[0])
    assert 'liver_dice' in r.stdout

def test_predict_dicom_matches_its_nifti_twin(flow):
    "A CHAOS-style DICOM series and the NIfTI of the same phantom give the same labels on the same world grid"
    case = write_chaos_case(flow/'chaos'/'c1', seed=5, **PH)
    dcm = read_dicom_series(case/'DICOM')
    twin = flow/'twin.nii.gz'
    import nibabel as nib
    nib.save(nib.Nifti1Image(dcm.array, dcm.affine), str(twin))
    run('predict', flow/'model', case/'DICOM', flow/'from_dicom.nii.gz')
    run('predict', flow/'model', twin, flow/'from_nifti.nii.gz')
    a, b = read_labels(flow/'from_dicom.nii.gz'), read_labels(flow/'from_nifti.nii.gz')
    np.testing.assert_allclose(a.affine, dcm.affine, atol=1e-4)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_array_equal(a.array, b.array)

def test_predict_slice_folder_writes_one_mask_per_image(flow):
    images = flow/'slices'/'images'
    r = run('predict', flow/'model', images, flow/'slice_pred', '--encoding', '127')
    names_in = sorted(p.stem for p in images.iterdir())
    names_out = sorted(p.stem for p in (flow/'slice_pred').iterdir())
    assert names_in == names_out
    from PIL import Image
    vals = set()
    for p in list((flow/'slice_pred').iterdir())[:10]: vals |= set(np.unique(np.asarray(Image.open(p))).tolist())
    assert vals <= {0, 127, 255}
    r = run('evaluate', flow/'slice_pred', flow/'slices'/'masks')
    assert 'volume-0' in r.stdout

def test_folder_of_volumes_two_workers_equal_one_and_parts(flow):
    "--workers 2 and --part 1/2 + 2/2 write the same files, bytes equal to one process's; each volume once"
    one, two, parts = flow/'many_1', flow/'many_2', flow/'many_parts'
    run('predict', flow/'model', flow/'lits', one)
    r = run('predict', flow/'model', flow/'lits', two, '--workers', 2)
    names = ['segmentation-0.nii.gz', 'segmentation-1.nii.gz', 'segmentation-2.nii.gz']
    assert sorted(p.name for p in one.iterdir()) == names == sorted(p.name for p in two.iterdir())
    assert r.stdout.count(' -> ') == 3
    run('predict', flow/'model', flow/'lits', parts, '--part', '1/2')
    assert sorted(p.name for p in parts.iterdir()) == names[0::2]
    run('predict', flow/'model', flow/'lits', parts, '--part', '2/2')
    for n in names:
        a, b, c = (read_labels(d/n) for d in (one, two, parts))
        assert np.array_equal(a.array, b.array) and np.array_equal(a.array, c.array)
        assert np.allclose(a.affine, read_nifti(flow/'lits'/n.replace('segmentation', 'volume')).affine)
    before = (parts/names[1]).read_bytes()
    r = run('predict', flow/'model', flow/'lits', parts, '--part', '2/2', ok=False)
    assert r.returncode == 2 and 'exists' in r.stderr and (parts/names[1]).read_bytes() == before
    r = run('evaluate', one, flow/'lits', '--csv', flow/'many.csv')   # segmentation-N paired with the LiTS folder's truth
    assert r.stdout.startswith('case ')   # no progress-bar characters before the table
    assert list(pd.read_csv(flow/'many.csv')['case'].astype(str)) == ['0', '1', '2']

def test_kill_9_during_predict_leaves_no_output(flow, tmp_path):
    "SIGKILL while the output is being written (its temporary file exists): the output name never appears"
    import signal, time
    vol, _ = write_lits_case(tmp_path, case_id=5, seed=5, shape=(256, 256, 96), spacing=(1.5, 1.5, 2.0))
    out = tmp_path/'pred.nii.gz'
    proc = subprocess.Popen(CLI + ['predict', str(flow/'model'), str(vol), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, t0 = False, time.time()
    while proc.poll() is None and time.time() - t0 < 600:
        if any(p.name.startswith('.pred.tmp-') for p in tmp_path.iterdir()): seen = True; break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL); proc.wait()
    if not seen: pytest.skip("the prediction finished before its output file could be caught being written")
    assert not out.exists()
    run('predict', flow/'model', vol, out)   # a rerun writes it whole; the killed run's temporary file is not in the way
    assert read_labels(out).shape == (256, 256, 96)

def test_tta_refused_for_a_model_trained_without_flips(flow):
    "--tta on a model whose recipe says flip false: exit 2, one line naming the option and the model, nothing written"
    out = flow/'pred_tta.nii.gz'
    r = run('predict', flow/'model', flow/'lits'/'volume-0.nii.gz', out, '--tta', ok=False)
    assert r.returncode == 2 and not out.exists(), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and '--tta' in lines[0] and 'without left-right flips' in lines[0] and str(flow/'model') in lines[0]
    r = run('predict', flow/'model', flow/'slices'/'images', flow/'pred_tta_slices', '--tta', ok=False)
    assert r.returncode == 2 and not (flow/'pred_tta_slices').exists()


def test_existing_output_is_kept_without_force(flow):
    out = flow/'pred_keep.nii.gz'
    out.write_bytes(b'keep me')
    r = run('predict', flow/'model', flow/'lits'/'volume-0.nii.gz', out, ok=False)
    assert r.returncode == 2 and 'exists' in r.stderr and out.read_bytes() == b'keep me'
    run('predict', flow/'model', flow/'lits'/'volume-0.nii.gz', out, '--force')
    assert read_labels(out).shape == PH['shape']

def test_demo_runs_end_to_end_small(tmp_path, monkeypatch, capsys):
    "`liver-seg demo -q` at a tiny size: one line naming the report; a report with finite metrics, figures and the paths it wrote"
    from liver_seg import demo
    from liver_seg.cli import main
    for k, v in dict(n_train=2, shape=(64, 64, 8), size=64, epochs=1, bs=4, arch='resnet18').items():
        monkeypatch.setitem(demo.DEMO_RECIPE, k, v)   # the command's recipe, at a tiny size
    assert main(['demo', '--out', str(tmp_path/'demo'), '-q']) == 0
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and out.startswith('report: ')
    report = tmp_path/'demo'/'report.md'
    m = pd.read_csv(tmp_path/'demo'/'metrics.csv')
    assert math.isfinite(m.liver_dice[0]) and math.isfinite(m.liver_volume_ml_gt[0])
    text = report.read_text()
    assert 'Held-out liver Dice' in text and 'montage_liver.png' in text
    for png in ('montage_liver.png', 'montage_tumor.png', 'learning_curves.png'):
        assert (tmp_path/'demo'/png).stat().st_size > 1000


# --- help that tells the truth, -q, and the HD95 conventions -------------------------------------------------------

COMMANDS = ['prepare', 'train', 'predict', 'evaluate', 'demo']

def option_help(help_text, flag):
    "The help of `flag` in an argparse help text, its continuation lines joined"
    lines = help_text.splitlines()
    i = next(i for i, l in enumerate(lines) if l.strip().startswith(flag + ' ') or l.strip() == flag)
    out = [lines[i].strip()[len(flag):].strip()]
    for l in lines[i+1:]:
        if not l.startswith(' ' * 8) or l.strip().startswith('-'): break
        out.append(l.strip())
    return ' '.join(out).replace('- ', '-')   # argparse may wrap a line after a hyphen

@pytest.mark.parametrize('cmd', COMMANDS)
def test_help_shows_value_names_and_quiet(cmd):
    "No fastcore type placeholders, no `(default: True)` on a flag that turns something off, and -q everywhere"
    h = run(cmd, '-h').stdout
    for bad in ('(str)', '(int)', '(float)', '(default: True)'): assert bad not in h, f"{cmd} -h shows {bad}"
    assert '-q, --quiet' in h and 'only the' in option_help(h, '-q, --quiet')

def test_negated_flags_describe_what_they_do():
    pre = option_help(run('train', '-h').stdout, '--no-pretrained')
    assert 'from scratch' in pre and 'default' not in pre
    post = option_help(run('predict', '-h').stdout, '--no-postprocess')
    assert 'without the post-processing' in post and 'default' not in post

def test_train_out_is_required(tmp_path):
    h = run('train', '-h').stdout
    usage = ' '.join(h.split('\n\n')[0].split())
    assert ' --out MODEL_DIR ' in usage and '[--out' not in usage   # required: no brackets
    r = run('train', tmp_path, ok=False)
    assert r.returncode == 2 and 'required' in r.stderr and '--out' in r.stderr and not (tmp_path/'model').exists()

def test_quiet_prints_only_the_last_line(flow, tmp_path):
    "-q: prepare, predict and evaluate print one line and nothing on stderr (train -q is run by the `flow` fixture)"
    r = run('prepare', flow/'lits', tmp_path/'slices', '--format', 'png', '-q')
    assert r.stdout.count('\n') == 1 and r.stdout.startswith('prepared 36 slices of 3 cases') and r.stderr == ''
    r = run('predict', flow/'model', flow/'lits', tmp_path/'pred', '-q')
    assert r.stdout == f"prediction: {tmp_path/'pred'}\n" and r.stderr == ''
    r = run('evaluate', tmp_path/'pred', flow/'lits', '-q', '--csv', tmp_path/'m.csv')
    assert r.stdout.count('\n') == 1 and r.stdout.startswith('global Dice') and '(3 cases; HD95 pooled)' in r.stdout
    r = run('evaluate', tmp_path/'pred', flow/'lits')
    assert r.stdout.count('\n') > 5   # without -q: the table

def directed_distances(a, b, spacing):
    "Distances in mm from each surface voxel of `a` to the nearest surface voxel of `b` (scipy's distance transform)"
    from scipy import ndimage as ndi
    faces = ndi.generate_binary_structure(3, 1)
    surf = lambda m: m & ~ndi.binary_erosion(m, faces)
    return ndi.distance_transform_edt(~surf(b), sampling=spacing)[surf(a)]

def test_evaluate_hd95_conventions(tmp_path):
    "A liver predicted with a stray blob: pooled HD95 does not see it, MONAI's does; output and CSV name the convention"
    import nibabel as nib
    g = np.ogrid[:40, :40, :30]
    truth = ((g[0] - 15) ** 2 + (g[1] - 15) ** 2 + (g[2] - 12) ** 2 <= 64)
    pred = truth.copy(); pred[30:34, 30:34, 20:24] = True
    spacing = (0.8, 0.8, 2.0)
    for name, m in (('gt', truth), ('pred', pred)):
        nib.save(nib.Nifti1Image(m.astype(np.uint8), np.diag([*spacing, 1.])), str(tmp_path/f'{name}.nii.gz'))
    d_pg, d_gp = directed_distances(pred, truth, spacing), directed_distances(truth, pred, spacing)
    want = dict(pooled=np.percentile(np.concatenate([d_pg, d_gp]), 95),
                monai=max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    assert want['pooled'] == 0 and want['monai'] > 10
    for conv, extra in (('pooled', []), ('monai', ['--hd95', 'monai'])):
        r = run('evaluate', tmp_path/'pred.nii.gz', tmp_path/'gt.nii.gz', '--csv', tmp_path/f'{conv}.csv', *extra)
        assert f'HD95 convention {conv}:' in r.stdout
        df = pd.read_csv(tmp_path/f'{conv}.csv')
        assert 'hd95_convention' in df.columns and list(df['hd95_convention']) == [conv]
        assert math.isclose(df.liver_hd95_mm[0], want[conv], rel_tol=1e-6, abs_tol=1e-9)   # NIfTI stores the spacing as float32
    r = run('evaluate', tmp_path/'pred.nii.gz', tmp_path/'gt.nii.gz', '--hd95', 'max', ok=False)
    assert r.returncode == 2 and 'pooled' in r.stderr and 'monai' in r.stderr


def test_one_model_for_gray_slices_and_hu(tmp_path):
    "HU cases exported through the LiTS window (prepare's default) train with a folder of 8-bit slices; the model records the window and segments HU"
    import json
    from PIL import Image
    from liver_seg.io import to_display
    from liver_seg.windows import gray_window
    make_phantom_dataset(tmp_path/'lits', n_cases=3, kind='lits', seed=3, **PH)
    run('prepare', tmp_path/'lits', tmp_path/'gray', '--format', 'png', '-q')
    eight = tmp_path/'eight'; (eight/'images').mkdir(parents=True); (eight/'masks').mkdir()
    vol, seg = write_lits_case(tmp_path/'src8', case_id=5, seed=21, **PH)    # an 8-bit dataset: other patients, 0/127/255 masks
    hu, lab = read_nifti(vol).array, read_labels(seg).array
    for k in range(hu.shape[2]):
        Image.fromarray(gray_window(to_display(hu[:, :, k]))).save(eight/'images'/f'p5_{k}.png')
        Image.fromarray(np.array([0, 127, 255], np.uint8)[to_display(lab[:, :, k])]).save(eight/'masks'/f'p5_{k}.png')
    r = run('train', tmp_path/'gray', eight, '--out', tmp_path/'model', '--arch', 'resnet18', '--size', 64, '--epochs', 1,
            '--bs', 8, '--no-pretrained', '--valid-cases', 'p5', '-q')
    cfg = json.loads((tmp_path/'model'/'config.json').read_text())
    assert cfg['input']['kind'] == 'image' and cfg['input']['hu_window'] == [400, 50]
    assert cfg['split'] == {'train_cases': ['volume-0', 'volume-1', 'volume-2'], 'valid_cases': ['p5']}
    coarse = json.loads((tmp_path/'model'/'coarse'/'config.json').read_text())      # every slice of both folders, whole
    assert len(cfg['recipe']['data']) == 2 and coarse['recipe']['n_train'] == 36 and coarse['recipe']['n_valid'] == 12
    assert coarse['input'] == cfg['input']
    out = tmp_path/'hu.nii.gz'
    run('predict', tmp_path/'model', vol, out, '-q')                             # a HU volume: through the recorded window
    assert read_labels(out).shape == hu.shape
    run('prepare', tmp_path/'lits', tmp_path/'rgb', '--format', 'png', '--windows', 'liver,custom', '-q')  # the seed's 3 channels
    r = run('train', tmp_path/'rgb', eight, '--out', tmp_path/'mixed', '--no-pretrained', '-q', ok=False)
    assert r.returncode == 2 and str(eight) in r.stderr and '--windows lits' in r.stderr and not (tmp_path/'mixed').exists()


def test_monitor_chooses_the_kept_epoch_in_both_stages(flow, tmp_path):
    "`--monitor last` keeps the final epoch of the coarse and the fine stage and says so; `--min-epoch` reaches the fine stage; bad rules are refused before any work"
    import json
    from liver_seg.train import settled_epoch
    run('train', flow/'slices', '--out', tmp_path/'m', '--arch', 'simple_cnn', '--size', 32, '--epochs', 3, '--bs', 8,
            '--no-pretrained', '--valid-cases', 'volume-2', '--monitor', 'last', '--min-epoch', 1, '-q')
    stages = (tmp_path/'m', tmp_path/'m'/'coarse')
    fine, coarse = (json.loads((d/'config.json').read_text())['recipe'] for d in stages)
    for stage, rec in zip(stages, (fine, coarse)):
        assert (rec['monitor'], rec['best_epoch']) == ('last', len(pd.read_csv(stage/'history.csv')) - 1)
    assert fine['min_epoch'] == 1 and coarse['min_epoch'] == settled_epoch(coarse['epochs']) != 1  # the flag is the fine stage's, like --epochs
    r = run('train', flow/'slices', '--out', tmp_path/'bad', '--no-pretrained', '--monitor', 'valid_loss', ok=False)
    assert r.returncode == 2 and '--monitor' in r.stderr and 'liver_dice' in r.stderr and not (tmp_path/'bad').exists()
    r = run('train', flow/'slices', '--out', tmp_path/'bad', '--no-pretrained', '--epochs', 3, '--min-epoch', 3, ok=False)
    assert r.returncode == 2 and '--min-epoch: must be an epoch from 0 to 2' in r.stderr and not (tmp_path/'bad').exists()
