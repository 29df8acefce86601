"One view of every CT: the same labels in space whatever a file's voxel order, and radiological pictures (issue 13)"
import subprocess, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from liver_seg.prepare import prepare
from liver_seg.io import (read_dicom_series, read_labels, read_mask, read_image, to_canonical, from_canonical,
                          find_dicom_files)
from liver_seg.predict import predict_path
from liver_seg.synth import make_phantom_dataset, write_chaos_case, write_lits_case
from liver_seg.train import train
from liver_seg.viewer import load_case
from liver_seg.windows import gray_window

ROOT = Path(__file__).resolve().parents[1]
REAL_IO = ROOT.parent/'shared'/'data'/'real-ct-io'/'totalsegmentator_example'
SHAPE = dict(shape=(64, 64, 12), spacing=(1.6, 1.6, 5.0))
# the same image in space, stored in other voxel orders: the phantom's own (L, P, S), RAS, the canonical order,
# rows and columns swapped, slices on the first axis, and every axis reversed
ORDERS = [None, ('R', 'A', 'S'), ('L', 'A', 'S'), ('P', 'L', 'S'), ('S', 'R', 'A'), ('R', 'A', 'I'), ('I', 'L', 'P')]


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    "A small U-Net trained on phantom slices exported by `prepare` (15-60 s here: liver Dice ~0.85 on a new phantom)"
    tmp = tmp_path_factory.mktemp('orient')
    make_phantom_dataset(tmp/'lits', n_cases=3, kind='lits', seed=11, **SHAPE)
    prepare(tmp/'lits', tmp/'slices', fmt='png', progress=False)
    return train(tmp/'slices', tmp/'model', arch='resnet18', size=64, epochs=4, bs=4, lr=3e-3, valid_cases=['volume-2'],
                 pretrained=False, progress=False, seed=0)


def _in_space(path) -> np.ndarray:
    "Labels of a NIfTI file in canonical voxel order: equal arrays mean equal labels at the same points in space"
    return to_canonical(read_labels(path)).array


def test_every_voxel_order_gives_the_same_labels_in_space(model, tmp_path):
    labels = []
    for n, codes in enumerate(ORDERS):
        vol_p, _ = write_lits_case(tmp_path/'in', n, axcodes=codes, seed=(11, 99), **SHAPE)
        out_p = predict_path(model, vol_p, tmp_path/f'pred-{n}.nii.gz', progress=False)
        src, out = nib.load(vol_p), nib.load(out_p)
        if codes is not None: assert nib.aff2axcodes(src.affine) == codes
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(out.header.get_qform(), src.header.get_qform(), atol=1e-6)
        np.testing.assert_allclose(out.header.get_sform(), src.header.get_sform(), atol=1e-6)
        assert (int(out.header['qform_code']), int(out.header['sform_code'])) == (1, 1)
        labels.append(_in_space(out_p))
    truth = to_canonical(read_labels(tmp_path/'in'/'segmentation-0.nii.gz')).array > 0
    found = labels[0] > 0
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.5   # it finds the liver: equality below is not trivial
    for n, lab in enumerate(labels[1:], 1):
        assert np.array_equal(lab, labels[0]), f"{ORDERS[n]}: {(lab != labels[0]).sum()} voxels differ in space"


def test_command_line_same_labels_for_ras_and_lps(model, tmp_path):
    "The same through `liver-seg predict` in a subprocess, for the two commonest orders"
    outs = []
    for n, codes in enumerate([None, ('R', 'A', 'S')]):
        vol_p, _ = write_lits_case(tmp_path, n, axcodes=codes, seed=(11, 98), **SHAPE)
        out = tmp_path/f'seg-{n}.nii.gz'
        r = subprocess.run([sys.executable, '-m', 'liver_seg', 'predict', str(model), str(vol_p), str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(_in_space(out))
    assert np.array_equal(outs[0], outs[1])


def test_dicom_series_and_its_nifti_twin_in_another_order(model, tmp_path):
    case = write_chaos_case(tmp_path/'case', seed=(11, 97), **SHAPE)
    twin, _ = write_lits_case(tmp_path/'twin', 5, axcodes=('R', 'A', 'S'), seed=(11, 97), **SHAPE)
    dcm = predict_path(model, case/'DICOM', tmp_path/'from_dicom.nii.gz', progress=False)
    nii = predict_path(model, twin, tmp_path/'from_nifti.nii.gz', progress=False)
    assert nib.aff2axcodes(nib.load(dcm).affine) == ('L', 'P', 'S')      # the series' own order
    assert nib.aff2axcodes(nib.load(nii).affine) == ('R', 'A', 'S')      # the twin's own order
    a, b = _in_space(dcm), _in_space(nii)
    assert (a == 1).sum() > 0.02 * a.size
    assert np.array_equal(a, b)


def test_model_from_before_the_convention_is_refused_for_volumes(model, tmp_path):
    import json, shutil
    old = tmp_path/'old_model'
    shutil.copytree(model, old)
    cfg = json.loads((old/'config.json').read_text()); del cfg['orientation']
    (old/'config.json').write_text(json.dumps(cfg))
    vol_p, _ = write_lits_case(tmp_path, 1, seed=1, **SHAPE)
    r = subprocess.run([sys.executable, '-m', 'liver_seg', 'predict', str(old), str(vol_p), str(tmp_path/'o.nii.gz')],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'config.json' in lines[0] and 'retrain' in lines[0], r.stderr
    assert not (tmp_path/'o.nii.gz').exists()


def _spine_below_liver_left(img_rows_cols_liver, spine):
    "Liver centroid left of the image centre, spine centroid below it (display orientation, H x W masks)"
    liver = img_rows_cols_liver
    rows, cols = np.indices(liver.shape)
    h, w = liver.shape
    assert liver.any() and spine.any()
    assert cols[liver].mean() < w/2, (cols[liver].mean(), w)
    assert rows[spine].mean() > h/2, (rows[spine].mean(), h)


def test_phantom_slices_from_prepare_and_viewer_are_radiological(tmp_path):
    for n, codes in enumerate([None, ('R', 'A', 'S'), ('S', 'L', 'P')]):
        vol_p, seg_p = write_lits_case(tmp_path/f'lits{n}', n, axcodes=codes, seed=4, **SHAPE)
        prepare(tmp_path/f'lits{n}', tmp_path/f'slices{n}', fmt='png', progress=False)
        imgs, labs, _, _ = load_case(vol_p, seg_p)                       # what the viewer shows
        k = int(np.argmax((labs > 0).sum((0, 1))))
        hu = imgs[..., k]
        _spine_below_liver_left(labs[..., k] > 0, hu > 300)
        written = read_mask(tmp_path/f'slices{n}'/'masks'/f'volume-{n}_{k:04d}.png')
        raw = np.asarray(Image.open(tmp_path/f'slices{n}'/'masks'/f'volume-{n}_{k:04d}.png'))
        assert set(np.unique(raw)) <= {0, 1, 2}
        assert np.array_equal(written, labs[..., k])                     # prepare writes what the viewer shows
        assert np.array_equal(read_image(tmp_path/f'slices{n}'/'images'/f'volume-{n}_{k:04d}.png'), gray_window(hu))  # prepare's default: the lits window


needs_real = pytest.mark.skipif(not REAL_IO.is_dir(), reason="../shared/data/real-ct-io is not beside the project")


@needs_real
def test_real_dicom_series_and_nifti_twin_are_radiological(tmp_path):
    "TotalSegmentator's real 20-slice DICOM series (stored L, P, S) and its reference segmentation (stored L, A, S)"
    series, seg_p = REAL_IO/'example_ct_dicom', REAL_IO/'example_seg_dicom.nii.gz'
    dvol = read_dicom_series(series)
    seg = read_labels(seg_p)
    assert nib.aff2axcodes(dvol.affine) != nib.aff2axcodes(seg.affine)   # the two files store their voxels differently
    twin = to_canonical(dvol, ('R', 'A', 'S'))                           # a NIfTI twin in a third voxel order
    img = nib.Nifti1Image(np.ascontiguousarray(twin.array), twin.affine)
    img.header.set_qform(twin.affine, 1); img.header.set_sform(twin.affine, 1)
    nib.save(img, tmp_path/'twin.nii.gz')
    shown = {}
    for name, src in (('dicom', series), ('nifti', tmp_path/'twin.nii.gz')):
        imgs, labs, _, _ = load_case(src, seg_p)
        shown[name] = (imgs, labs)
        k = int(np.argmax((labs == 5).sum((0, 1))))                      # TotalSegmentator: 5 liver
        spine = (labs[..., k] >= 26) & (labs[..., k] <= 50)              # TotalSegmentator v2: 26-50 vertebrae
        _spine_below_liver_left(labs[..., k] == 5, spine)
    assert np.array_equal(shown['dicom'][0], shown['nifti'][0]) and np.array_equal(shown['dicom'][1], shown['nifti'][1])
    # displayed DICOM slices are the files' pixel arrays, as any DICOM viewer shows them
    first = sorted(find_dicom_files(series), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[0]
    ds = pydicom.dcmread(first)
    assert np.array_equal(shown['dicom'][0][..., 0], (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.int16))


@needs_real
def test_real_dicom_case_through_prepare_is_radiological(tmp_path):
    "The real series as a CHAOS-style case (its liver as per-slice masks) exported by `prepare`"
    series, seg = REAL_IO/'example_ct_dicom', read_labels(REAL_IO/'example_seg_dicom.nii.gz')
    dvol = read_dicom_series(series)
    liver_in_series_order = from_canonical(to_canonical(seg).array == 5, dvol)     # the series' own (X, Y, Z) order
    case = tmp_path/'src'/'case1'
    (case/'masks').mkdir(parents=True)
    (case/'DICOM').symlink_to(series.resolve())
    hdrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in find_dicom_files(series)]
    z = sorted(float(h.ImagePositionPatient[2]) for h in hdrs)
    for h in hdrs:   # CHAOS numbers masks in InstanceNumber order, each in the DICOM image's row/column layout
        k = z.index(float(h.ImagePositionPatient[2]))
        rank = sorted(int(x.InstanceNumber) for x in hdrs).index(int(h.InstanceNumber))
        Image.fromarray((liver_in_series_order[:, :, k].T * 255).astype(np.uint8)).save(case/'masks'/f'liver_GT_{rank:03d}.png')
    prepare(tmp_path/'src', tmp_path/'slices', fmt='png', progress=False)
    imgs, labs, _, _ = load_case(series, seg)
    k = int(np.argmax((labs == 5).sum((0, 1))))
    mask = read_mask(tmp_path/'slices'/'masks'/f'case1_{k:04d}.png')
    assert np.array_equal(mask, (labs[..., k] == 5).astype(np.uint8))
    assert np.array_equal(read_image(tmp_path/'slices'/'images'/f'case1_{k:04d}.png'), gray_window(imgs[..., k]))
    _spine_below_liver_left(mask > 0, (labs[..., k] >= 26) & (labs[..., k] <= 50))
