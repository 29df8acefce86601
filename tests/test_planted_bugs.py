"""Tests for bugs that got past the rest of the suite when planted on a copy of main (issue 18).

Each test checks values against a direct computation (not only shapes or label sets), on tiny synthetic data:
1. `Predictor.labels` resizes logits bilinearly before the argmax;  2. post-processing keeps tumour only inside
the kept liver;  3. the `foreground_acc` training records ignores background pixels;  4. 'auto' precision follows
the CPU's bf16 capability (patched both ways);  5. `prepare` writes 0/1/2 mask PNGs;  6. `evaluate` scores each
prediction against its own truth;  7. the minimum tumour size is in mm^3;  8. `predict` uses the model's windows.
Also: DICOM slice order by position, and ASSD when its two directions differ.
Volume-level inputs are chosen so that their results do not depend on the voxel order a reader picks."""
import math, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from PIL import Image
from scipy import ndimage as ndi

from liver_seg.evaluate import case_metrics, distance_metrics, evaluate
from liver_seg.prepare import prepare
from liver_seg.model import default_config
from liver_seg.postprocess import postprocess
from liver_seg.predict import Predictor, predict_volume
from liver_seg.synth import make_phantom, write_chaos_case, write_lits_case

sys.path.insert(0, str(Path(__file__).parent))
from models import BrightIsLiver  # noqa: E402



# 1. logits resized to the slice with bilinear interpolation (not nearest) before the argmax
class FixedLogits(torch.nn.Module):
    "Ignores its input: the same fixed logits at the model's size for every slice"
    def __init__(self, logits):
        super().__init__()
        self.register_buffer('logits', logits)
    def forward(self, x): return self.logits.expand(x.shape[0], -1, -1, -1)


def test_labels_resize_logits_bilinear_then_argmax():
    size, (h, w) = 5, (17, 23)   # model size and a slice size that is no multiple of it
    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (1, 3, size, size)).astype(np.float32))
    cfg = default_config(arch='fixed', size=size, precision='fp32', tumor_contrast=None)  # the argmax, without the tumour rule
    pred = Predictor(FixedLogits(logits), cfg, device='cpu')
    imgs = np.zeros((2, h, w, 3), np.uint8)
    got = pred.labels(imgs)
    want = F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=False).argmax(1)[0].numpy()
    nearest = F.interpolate(logits, size=(h, w), mode='nearest').argmax(1)[0].numpy()
    assert (want != nearest).sum() > 20  # the two resizes really disagree here
    assert got.shape == (2, h, w) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)


# 2. tumour outside the kept liver does not survive post-processing
def test_postprocess_drops_tumour_outside_the_liver():
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[10:30, 10:30, 5:15] = 1
    lab[18:30, 18:30, 5:15] = 0        # an L-shaped liver: its bounding box has an empty corner
    lab[12:16, 12:16, 8:12] = 2        # tumour inside the liver
    lab[22:27, 22:27, 8:12] = 2        # a 100-voxel tumour blob in the empty corner, 4 voxels away from the liver
    assert ndi.label(lab > 0, np.ones((3, 3, 3)))[1] == 2
    for fill in ('3d', '2d', None):
        out = postprocess(lab, fill_holes=fill)
        assert (out[22:27, 22:27, 8:12] == 0).all(), fill         # gone, neither tumour nor liver
        assert (out[12:16, 12:16, 8:12] == 2).all(), fill         # the tumour inside the liver stays
        assert (out == 2).sum() == 4 * 4 * 4, fill
        assert ((out > 0) == ((lab == 1) | (out == 2))).all(), fill  # the liver is kept as it was


# 3. the `foreground_acc` of training leaves the background out; `cust_foreground_acc` counts every pixel
class KnownValidPredictions(Callback):
    """In validation, replace the network's output by seeded logits right on most foreground pixels and random on the
    background (so foreground-only and all-pixel accuracy differ a lot), and keep what the metrics see"""
    order = 45  # after CPUBF16 (10) made the predictions float, before the Recorder (50) accumulates
    def before_fit(self): self.batches, self.gen = [], torch.Generator().manual_seed(0)
    def after_pred(self):
        if self.training: return
        y = self.y.squeeze(1) if self.y.ndim == 4 else self.y
        noise = torch.randn(self.pred.shape, generator=self.gen)
        hit = F.one_hot(y.long().cpu(), self.pred.shape[1]).permute(0, 3, 1, 2) * (y.cpu() > 0)[:, None]
        self.learn.pred = (noise + 2.5 * hit).to(self.pred.device)
    def after_batch(self):
        if not self.training: self.batches.append((self.pred.detach().float().cpu(), self.y.detach().cpu()))


@pytest.fixture(scope='module')
def trained_one_epoch(tmp_path_factory):
    from liver_seg.data import toy_slice_folder
    from liver_seg.train import train
    root = tmp_path_factory.mktemp('fgacc')
    data = toy_slice_folder(root/'toy', n_cases=3, n_slices=4, size=24)
    keep = KnownValidPredictions()
    out = train(data, root/'model', arch='simple_cnn', size=16, epochs=1, bs=3, valid_cases=['2'], pretrained=False,
                precision='fp32', augment=False, progress=False, cbs=[keep], cascade=False)  # whole slices: background to count
    return pd.read_csv(out/'history.csv'), keep.batches


def test_training_foreground_acc_ignores_background(trained_one_epoch):
    "The `foreground_acc` column train records, against a direct count on the predictions its validation saw"
    hist, batches = trained_one_epoch
    assert len(batches) >= 2  # several validation batches: the value is the batch-size weighted mean
    n = [len(y) for _, y in batches]

    def weighted(f): return sum(f(p, y) * k for (p, y), k in zip(batches, n)) / sum(n)
    def fg(p, y):
        y = y.squeeze(1) if y.ndim == 4 else y
        m = y != 0
        return (p.argmax(1)[m] == y[m]).float().mean().item()
    def every_px(p, y):
        y = y.squeeze(1) if y.ndim == 4 else y
        return (p.argmax(1) == y).float().mean().item()
    want_fg, want_all = weighted(fg), weighted(every_px)
    assert want_fg > 0.8 and want_all < 0.6  # the two accuracies really differ on these predictions
    assert hist['foreground_acc'].iloc[-1] == pytest.approx(want_fg, abs=1e-5)
    assert hist['cust_foreground_acc'].iloc[-1] == pytest.approx(want_all, abs=1e-5)


# 4. precision 'auto' follows the CPU's bf16 capability, patched every way (not only this machine's answer):
#    the kernel's flags where /proc/cpuinfo exists, else torch's own checks
@pytest.mark.parametrize('flags,torch_says', [({'avx2', 'amx_bf16', 'amx_tile'}, False), ({'avx512f', 'avx512_bf16'}, False),
                                              ({'avx2', 'avx512f'}, True), (None, True), (None, False), (None, 'raise')])
def test_auto_precision_follows_cpu_bf16(monkeypatch, flags, torch_says):
    import liver_seg.config
    from liver_seg.train import CPUBF16, resolve_precision
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False); monkeypatch.delenv('DNNL_MAX_CPU_ISA', raising=False)
    monkeypatch.setattr(liver_seg.config, 'cpu_flags', lambda: flags)

    def answer():
        if torch_says == 'raise': raise RuntimeError('no cpuinfo')
        return torch_says
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', answer, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', answer, raising=False)
    has = bool(flags & {'amx_bf16', 'avx512_bf16'}) if flags is not None else torch_says is True
    prec, cbs = resolve_precision('auto', 'cpu')
    assert prec == ('bf16' if has else 'fp32')
    assert [type(c) for c in cbs] == ([CPUBF16] if has else [])
    assert resolve_precision('fp32', 'cpu') == ('fp32', [])
    # a bf16 model folder predicts in bf16 only on such a CPU
    p = Predictor(torch.nn.Conv2d(3, 3, 1), default_config(arch='c', size=8, precision='bf16'), device='cpu')
    assert p.amp == ('bf16' if has else None)
    assert ('bf16' in repr(p)) == has


# 5. prepare writes masks as 0/1/2 PNGs (read raw, not through read_mask, which accepts 0/127/255 too)
def test_prepare_writes_raw_012_masks(tmp_path):
    shape = (40, 36, 6)
    write_lits_case(tmp_path/'src', 0, shape=shape, seed=3, n_tumors=3)
    _, lab, _ = make_phantom(shape, seed=3, n_tumors=3)
    assert (lab == 1).any() and (lab == 2).any()
    df = pd.read_csv(prepare(tmp_path/'src', tmp_path/'out', fmt='png', progress=False))
    masks = sorted((tmp_path/'out'/'masks').iterdir())
    assert len(masks) == len(df) == shape[2]
    counts = np.zeros(256, np.int64)
    for p in masks:
        im = Image.open(p)
        assert im.format == 'PNG' and im.mode == 'L'
        a = np.asarray(im)
        assert a.dtype == np.uint8 and set(np.unique(a).tolist()) <= {0, 1, 2}, (p.name, np.unique(a))
        counts += np.bincount(a.ravel(), minlength=256)
    assert counts[1] == (lab == 1).sum() and counts[2] == (lab == 2).sum() and counts.sum() == lab.size


# 6. evaluate scores every prediction against its own ground truth, for every metric
def _ball(shape, c, r, scale=(1, 1, 1)):
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((x - ci) * s) ** 2 for x, ci, s in zip(g, c, scale)) <= r * r


def _cases(shape):
    "{case: (pred, gt)}: different livers and tumours, imperfect predictions, so every metric differs between cases"
    specs = {'1': ((12, 12, 5), 8, (10, 11, 5), 3), '2': ((14, 10, 6), 6, (15, 9, 6), 2), '3': ((11, 13, 4), 9, (14, 15, 5), 4)}
    res = {}
    for i, (case, (lc, lr, tc, tr)) in enumerate(specs.items()):
        gt = np.zeros(shape, np.uint8)
        gt[_ball(shape, lc, lr)] = 1
        gt[_ball(shape, tc, tr) & (gt > 0)] = 2
        pred = np.zeros(shape, np.uint8)
        pred[_ball(shape, (lc[0] + 1, lc[1], lc[2]), lr - i % 2)] = 1
        pred[_ball(shape, (tc[0], tc[1] + 1, tc[2]), tr + 0.5) & (pred > 0)] = 2
        pred[2:4, 2:4, 1:3] = 2  # a false lesion
        res[case] = pred, gt
    return res


def _same(a, b):
    if isinstance(a, float) and math.isnan(a): return isinstance(b, float) and math.isnan(b)
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _check_rows(df, cases, spacing):
    assert sorted(df['case'].astype(str)) == sorted(cases)
    for _, row in df.iterrows():
        pred, gt = cases[str(row['case'])]
        want = case_metrics(pred, gt, spacing)
        assert set(want) <= set(df.columns)  # every metric is in the table
        for k, v in want.items():
            assert _same(row[k], v), (row['case'], k, row[k], v)
    # the test can tell: each case scored against another case's truth gives other liver and tumour numbers
    ks = sorted(cases)
    for a, b in zip(ks, ks[1:] + ks[:1]):
        own, other = case_metrics(*cases[a], spacing), case_metrics(cases[a][0], cases[b][1], spacing)
        assert not _same(own['liver_dice'], other['liver_dice']) and not _same(own['tumor_dice'], other['tumor_dice'])


def test_evaluate_nifti_folders_pair_each_case_with_its_own_truth(tmp_path):
    shape, spacing = (26, 24, 10), (0.75, 0.875, 2.0)  # exact in the float32 NIfTI header
    cases = _cases(shape)
    aff = np.diag([*spacing, 1.])  # RAS already: no reader reorders these voxels
    for d in ('pred', 'gt'): (tmp_path/d).mkdir()
    for case, (pred, gt) in cases.items():
        nib.save(nib.Nifti1Image(pred, aff), str(tmp_path/'pred'/f'segmentation-{case}.nii.gz'))
        nib.save(nib.Nifti1Image(gt, aff), str(tmp_path/'gt'/f'segmentation-{case}.nii.gz'))
    df = evaluate(tmp_path/'pred', tmp_path/'gt', verbose=False)
    _check_rows(df, cases, spacing)


def test_evaluate_mask_folders_pair_each_case_with_its_own_truth(tmp_path):
    shape = (26, 24, 10)
    cases = _cases(shape)
    (tmp_path/'pred').mkdir(); (tmp_path/'gt'/'masks').mkdir(parents=True)
    for case, (pred, gt) in cases.items():
        for k in range(shape[2]):  # slices numbered 8..17: numeric, not text, order
            Image.fromarray(np.ascontiguousarray(pred[:, :, k])).save(tmp_path/'pred'/f'{case}_{k + 8}.png')
            Image.fromarray(np.ascontiguousarray(gt[:, :, k])).save(tmp_path/'gt'/'masks'/f'{case}_{k + 8}.png')
    df = evaluate(tmp_path/'pred', tmp_path/'gt', verbose=False)
    _check_rows(df, cases, (1., 1., 1.))


# 7. the minimum tumour size is a volume in mm^3, not a voxel count
@pytest.mark.parametrize('spacing,kept,dropped', [
    ((2., 2., 2.), 3, 2),         # 8 mm^3 voxels: 3 voxels (24 mm^3) stay, 2 voxels (16 mm^3) go; 20 voxels would drop both
    ((0.5, 0.5, 0.5), 200, 100),  # 0.125 mm^3 voxels: 200 voxels (25 mm^3) stay, 100 voxels (12.5 mm^3) go; 20 voxels would keep both
])
def test_min_tumour_size_is_in_mm3(spacing, kept, dropped):
    lab = np.zeros((40, 40, 24), np.uint8)
    lab[2:38, 2:38, 2:22] = 1
    big, small = np.zeros(lab.shape, bool), np.zeros(lab.shape, bool)
    big[6:16, 6:16, 6:8].flat[:kept] = True    # first `kept` voxels of a 10x10x2 block (26-connected)
    small[24:34, 24:34, 6:8].flat[:dropped] = True
    assert ndi.label(big, np.ones((3, 3, 3)))[1] == ndi.label(small, np.ones((3, 3, 3)))[1] == 1
    lab[big | small] = 2
    out = postprocess(lab, spacing=spacing, min_tumor_mm3=20.)
    assert (out[big] == 2).all() and (out[small] == 1).all()
    assert (out == 2).sum() == kept


# 8. predict uses the windows the model's config.json names

def _rings(n=32, z=4):
    "HU constant along Z in concentric squares: the same array in any flipped or transposed voxel order"
    i = np.abs(np.arange(n) - (n - 1) / 2)
    d = np.maximum(i[:, None], i[None, :])
    hu = np.select([d < 4, d < 8, d < 12], [120, 40, 60], -200).astype(np.int16)
    return np.repeat(hu[:, :, None], z, -1)


def test_predict_uses_configured_windows():
    hu = _rings()
    windows = [[400, 50], [1500, -600]]  # the first window's middle is HU 50; the default liver window's is 30
    inp = {'kind': 'hu_windows', 'windows': windows, 'freqhist': True, 'context': 0}
    cfg = default_config(arch='bright', size=hu.shape[0], precision='fp32', input=inp, tumor_contrast=None)  # its dark rings are no lesions
    labels = predict_volume((BrightIsLiver().eval(), cfg), hu, postprocess=False, progress=False)
    np.testing.assert_array_equal(labels, (hu > 50).astype(np.uint8))
    # the test can tell: with the default windows the HU 40 ring is liver
    dflt = default_config(arch='bright', size=hu.shape[0], precision='fp32', input={**inp, 'windows': [[150, 30], [200, 60]]}, tumor_contrast=None)
    other = predict_volume((BrightIsLiver().eval(), dflt), hu, postprocess=False, progress=False)
    np.testing.assert_array_equal(other, (hu > 30).astype(np.uint8))
    assert (other != labels).sum() > 100


# extra: the slices of a DICOM series are ordered by position, whatever the file names and InstanceNumbers say
def test_dicom_series_slice_order_by_position(tmp_path):
    import pydicom
    from liver_seg.io import read_dicom_series
    shape, spacing = (24, 20, 7), (0.8, 0.9, 2.5)
    case = write_chaos_case(tmp_path/'c', shape=shape, seed=5, spacing=spacing)
    hu, _, aff = make_phantom(shape, spacing=spacing, seed=5)
    dcm = case/'DICOM'
    by_z = sorted((float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]), f) for f in dcm.iterdir())
    perm = [3, 0, 6, 2, 5, 1, 4]  # the k-th lowest slice is written as file IM0<perm[k]>: names shuffled against position
    for k, (_, f) in enumerate(by_z): f.rename(dcm/f'tmp{k}')
    for k in range(len(by_z)): (dcm/f'tmp{k}').rename(dcm/f'IM{perm[k]:02d}')
    files = sorted(dcm.iterdir())
    hdr = [pydicom.dcmread(f) for f in files]
    zs = [float(ds.ImagePositionPatient[2]) for ds in hdr]
    inst = [int(ds.InstanceNumber) for ds in hdr]
    assert zs != sorted(zs) and zs != sorted(zs, reverse=True)      # name order is not position order
    assert [inst[i] for i in np.argsort(zs)] == list(range(len(zs), 0, -1))  # InstanceNumber runs against position
    vol = read_dicom_series(dcm)
    arr = np.asarray(vol.array)
    assert arr.shape[2] == shape[2] and sorted(arr.shape) == sorted(shape)
    # slice k is the file at the k-th lowest position: its pixel data (HU = stored value - 1024, any in-plane order)
    for k, i in enumerate(np.argsort(zs)):
        want = hdr[i].pixel_array.astype(np.int32) - 1024
        np.testing.assert_array_equal(np.sort(arr[:, :, k], axis=None), np.sort(want, axis=None))
        assert (np.asarray(vol.affine) @ [0, 0, k, 1])[2] == pytest.approx(zs[i], abs=1e-3)
    # every voxel holds the phantom's HU at its own world position: voxel -> world (vol.affine) -> phantom voxel
    m = np.linalg.inv(aff) @ np.asarray(vol.affine, float)
    assert np.allclose(m, np.round(m), atol=1e-3)
    m = np.round(m).astype(int)
    assert (m[2] == [0, 0, 1, 0]).all()  # slice k is the phantom's slice k: both run upwards from the lowest
    src = m[:3, :3] @ np.indices(arr.shape).reshape(3, -1) + m[:3, 3:]
    assert (src >= 0).all() and (src < np.array(shape)[:, None]).all()
    np.testing.assert_array_equal(arr.reshape(-1), hu[tuple(src)])


# extra: ASSD pools both directions of surface distances, also when they differ
def test_assd_with_different_directions_matches_distance_transforms():
    shape, spacing = (30, 28, 16), (0.7, 0.9, 2.0)
    gt = _ball(shape, (10, 14, 8), 6, spacing)                      # a ball of 6 mm radius
    pred = np.roll(gt, 1, 0) | _ball(shape, (25, 14, 8), 2.5, spacing)  # it moved by a voxel, plus a blob 4 mm away
    faces = ndi.generate_binary_structure(3, 1)
    def surface(m): return m & ~ndi.binary_erosion(m, faces, border_value=0)
    sp, sg = surface(pred), surface(gt)
    d_pg = ndi.distance_transform_edt(~sg, sampling=spacing)[sp]   # pred's surface to gt's
    d_gp = ndi.distance_transform_edt(~sp, sampling=spacing)[sg]   # gt's surface to pred's
    assert d_pg.mean() > 3 * d_gp.mean() > 0 and len(d_pg) > len(d_gp)  # the two directions differ
    d = np.concatenate([d_pg, d_gp])
    m = distance_metrics(pred, gt, spacing)
    assert m['assd_mm'] == pytest.approx(d.mean(), rel=1e-9)
    assert m['hd95_mm'] == pytest.approx(np.percentile(d, 95), rel=1e-9)
    assert m['assd_mm'] == pytest.approx(distance_metrics(gt, pred, spacing)['assd_mm'], rel=1e-9)  # symmetric
    # case_metrics reports the same for liver (labels > 0) and tumour (label 2)
    c = case_metrics(pred.astype(np.uint8) * 2, gt.astype(np.uint8) * 2, spacing)
    assert c['liver_assd_mm'] == pytest.approx(d.mean(), rel=1e-9) and c['tumor_assd_mm'] == pytest.approx(d.mean(), rel=1e-9)
