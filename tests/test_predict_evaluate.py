"End-to-end prediction geometry and evaluation metrics (liver_seg.predict, liver_seg.evaluate)"
import math, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from liver_seg.evaluate import case_metrics, evaluate
from liver_seg.io import LiverSegError, read_mask, to_display
from liver_seg.model import default_config
from liver_seg.predict import predict_path, predict_volume
from liver_seg.synth import make_phantom, write_chaos_case, write_lits_case

sys.path.insert(0, str(Path(__file__).parent))
from models import BrightIsLiver, HU_INPUT, untrained_model_folder  # noqa: E402

SHAPE = (64, 48, 10)
def bright(kind='hu_windows'):
    return BrightIsLiver().eval(), default_config(arch='bright', size=64, precision='fp32', input={**HU_INPUT, 'kind': kind})


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    "A tiny untrained resnet34 U-Net model folder (geometry does not need training)"
    return untrained_model_folder(tmp_path_factory.mktemp('m') / 'model')


@pytest.fixture(scope='module')
def lits(tmp_path_factory):
    folder = tmp_path_factory.mktemp('lits')
    return write_lits_case(folder, 4, shape=SHAPE, seed=7)


def test_nifti_geometry_model_folder(lits, model_dir, tmp_path):
    vol_p, _ = lits
    src = nib.load(vol_p)
    assert src.affine[0, 0] < 0 and src.affine[1, 1] < 0 and abs(src.affine[2, 3]) > 100  # non-trivial geometry
    out_p = predict_path(model_dir, vol_p, tmp_path / 'pred.nii.gz', progress=False)
    out = nib.load(out_p)
    assert out.shape == src.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
    np.testing.assert_allclose(out.header.get_qform(), src.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(out.header.get_sform(), src.header.get_sform(), atol=1e-6)
    assert out.header['qform_code'] == src.header['qform_code'] and out.header['sform_code'] == src.header['sform_code']
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    with pytest.raises(LiverSegError, match='exists'): predict_path(model_dir, vol_p, out_p, progress=False)


def test_nifti_orientation(lits, tmp_path):
    "Labels land on the voxels they belong to: the known model's output equals HU > 30 in voxel order"
    vol_p, _ = lits
    out_p = predict_path(bright(), vol_p, tmp_path / 'pred.nii.gz', postprocess=False, progress=False)
    hu = np.asarray(nib.load(vol_p).dataobj)
    lab = np.asarray(nib.load(out_p).dataobj)
    assert (lab == (hu > 30)).mean() > 0.96
    for ax in (0, 1):  # a flipped output would agree far less (about 0.87)
        assert (lab == np.flip(hu > 30, ax)).mean() < 0.92


def test_dicom_matches_nifti_twin(lits, model_dir, tmp_path):
    vol_p, _ = lits
    case = write_chaos_case(tmp_path / 'chaos', shape=SHAPE, seed=7)
    for m in (bright(), model_dir):
        a = nib.load(predict_path(m, vol_p, tmp_path / 'a.nii.gz', force=True, progress=False))
        b = nib.load(predict_path(m, case / 'DICOM', tmp_path / 'b.nii.gz', force=True, progress=False))
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-3)
        assert b.shape == a.shape
        np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))


def test_image_model_refuses_hu(lits, tmp_path):
    with pytest.raises(LiverSegError, match='8-bit slice images'):
        predict_path(bright('image'), lits[0], tmp_path / 'x.nii.gz', progress=False)
    assert not (tmp_path / 'x.nii.gz').exists()


def test_image_model_with_hu_window_predicts_hu(lits, tmp_path):
    "An 8-bit model that records its HU window segments a HU volume as it segments that volume put through the window"
    from liver_seg.io import read_nifti
    model, cfg = bright('image')
    cfg['input']['hu_window'] = [150, 30]
    vol = read_nifti(lits[0])
    lo, hi = 30 - 75, 30 + 75
    g8 = np.floor((np.clip(vol.array.astype(np.float64), lo, hi) - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8)  # rounded half up
    from_hu = predict_volume((model, cfg), vol, postprocess=False, progress=False)
    from_gray = predict_volume((model, cfg), g8, affine=vol.affine, postprocess=False, progress=False)
    np.testing.assert_array_equal(from_hu, from_gray)
    assert 0.05 < (from_hu == 1).mean() < 0.6  # a real segmentation, not all or nothing
    cfg['input']['hu_window'] = [150, 400]     # another window: other gray levels, other labels
    assert (predict_volume((model, cfg), vol, postprocess=False, progress=False) != from_hu).mean() > 0.01


def test_slice_folder(tmp_path):
    hu, _, _ = make_phantom(SHAPE, seed=2)
    g8 = np.clip((hu.astype(np.float32) + 45) * (255 / 150), 0, 255).astype(np.uint8)
    (tmp_path / 'ds' / 'images').mkdir(parents=True)
    names = []
    for k in range(5):
        ext = '.jpg' if k == 3 else '.png'
        Image.fromarray(to_display(g8[:, :, k])).save(tmp_path / 'ds' / 'images' / f'3_{k + 20}{ext}')
        names.append(f'3_{k + 20}.png')
    out = predict_path(bright('image'), tmp_path / 'ds', tmp_path / 'masks', encoding='127', progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    m = read_mask(out / '3_21.png')
    assert m.shape == to_display(hu[:, :, 1]).shape
    assert (m == to_display(hu[:, :, 1] > 30)).mean() > 0.96
    assert set(np.unique(np.asarray(Image.open(out / '3_21.png')))) <= {0, 127, 255}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary left behind
    # a HU ('hu_windows') model refuses gray 8-bit slices
    with pytest.raises(LiverSegError, match='3-channel window images'):
        predict_path(bright(), tmp_path / 'ds', tmp_path / 'masks2', progress=False)
    assert not (tmp_path / 'masks2').exists()


def test_predict_volume_array_and_tta():
    hu, _, aff = make_phantom(SHAPE, seed=1)
    raw = predict_volume(bright(), hu, batch_size=3, postprocess=False, progress=False)
    assert raw.dtype == np.uint8 and raw.shape == hu.shape
    assert (raw == (hu > 30)).mean() > 0.96
    tta = predict_volume(bright(), hu, tta=True, postprocess=False, progress=False)
    assert (tta == raw).mean() > 0.99
    post = predict_volume(bright(), hu, affine=aff, progress=False)
    assert ndi.label(post > 0, np.ones((3, 3, 3)))[1] == 1


def _sphere(shape, c, r):
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((x - ci) ** 2 for x, ci in zip(g, c)) <= r * r


def test_self_metrics(tmp_path):
    gt = np.zeros((30, 30, 12), np.uint8)
    gt[_sphere(gt.shape, (15, 15, 6), 9)] = 1
    gt[_sphere(gt.shape, (12, 15, 6), 3)] = 2
    m = case_metrics(gt, gt, (0.7, 0.7, 2.5))
    for k in ('liver', 'tumor'):
        assert m[f'{k}_dice'] == 1 and m[f'{k}_iou'] == 1 and m[f'{k}_voe'] == 0 and m[f'{k}_rvd'] == 0
        assert m[f'{k}_assd_mm'] == 0 and m[f'{k}_hd95_mm'] == 0
    assert (m['tumor_lesions_true'], m['tumor_lesions_found'], m['tumor_lesions_false']) == (1, 1, 0)
    aff = np.diag([-0.7, -0.7, 2.5, 1.])
    nib.save(nib.Nifti1Image(gt, aff), str(tmp_path / 'gt.nii.gz'))
    df = evaluate(tmp_path / 'gt.nii.gz', tmp_path / 'gt.nii.gz', csv=tmp_path / 'm.csv', verbose=False)
    assert list(df.columns[:2]) == ['case', 'liver_dice'] and len(df) == 1
    assert df.loc[0, 'liver_dice'] == 1 and df.loc[0, 'tumor_hd95_mm'] == 0
    assert (tmp_path / 'm.csv').exists()
    # a different prediction scores lower
    pred = np.roll(gt, 2, 0)
    nib.save(nib.Nifti1Image(pred, aff), str(tmp_path / 'pred.nii.gz'))
    d2 = evaluate(tmp_path / 'pred.nii.gz', tmp_path / 'gt.nii.gz', verbose=False)
    assert d2.loc[0, 'liver_dice'] < 1 and d2.loc[0, 'liver_assd_mm'] > 0


def test_distances_match_brute_force():
    spacing = (0.6, 1.1, 2.7)
    a = _sphere((34, 30, 20), (14, 13, 9), 7)
    b = _sphere((34, 30, 20), (18, 15, 10), 6)
    m = case_metrics(a.astype(np.uint8) * 2, b.astype(np.uint8) * 2, spacing)

    def surface(x):
        return np.argwhere(x & ~ndi.binary_erosion(x)) * np.asarray(spacing)
    sa, sb = surface(a), surface(b)
    d = np.concatenate([cKDTree(sb).query(sa)[0], cKDTree(sa).query(sb)[0]])
    for k in ('liver', 'tumor'):
        assert math.isclose(m[f'{k}_assd_mm'], d.mean(), rel_tol=1e-9)
        assert math.isclose(m[f'{k}_hd95_mm'], np.percentile(d, 95), rel_tol=1e-9)
    assert m['tumor_assd_mm'] > 1  # the spheres really are apart


def test_empty_conventions():
    gt = np.zeros((10, 10, 10), np.uint8); gt[2:8, 2:8, 2:8] = 1
    m = case_metrics(gt, gt)
    assert m['tumor_dice'] == 1 and m['tumor_assd_mm'] == 0 and m['tumor_lesions_true'] == 0
    pred = gt.copy(); pred[4:6, 4:6, 4:6] = 2
    m = case_metrics(pred, gt)
    assert m['tumor_dice'] == 0 and math.isnan(m['tumor_assd_mm']) and m['tumor_lesions_false'] == 1
