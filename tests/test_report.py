"liver_seg.report: statistics, preview orientation and DICOM SEG round trips, on phantoms and (when present) real CT."
import json, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage as ndi

from liver_seg.io import (CTVolume, LiverSegError, read_chaos_case, read_dicom_series, read_labels, read_nifti,
                          to_canonical, from_canonical)
from liver_seg.report import (label_statistics, largest_diameter, plot_preview, read_dicom_seg,
                              statistics_table, write_dicom_seg, write_preview, write_statistics,
                              write_statistics_table)
from liver_seg.synth import write_chaos_case, write_lits_case

DATA = (Path(__file__).parents[1]/'..'/'shared'/'data').resolve()
TSEG = DATA/'real-ct-io'/'totalsegmentator_example'
LIVER_RGB = np.array([0.13, 0.80, 0.27]) * 255
try: import highdicom  # noqa: F401 (the optional dicom-seg extra)
except ImportError: highdicom = None
needs_highdicom = pytest.mark.skipif(highdicom is None, reason="highdicom (the dicom-seg extra) is not installed")


def grid_affine(spacing=(0.7, 0.9, 3.0), angle=0.3, flip=True, origin=(12., -30., 250.)):
    "An anisotropic affine, rotated about z and (optionally) flipped left-right"
    c, s = np.cos(angle), np.sin(angle)
    a = np.diag([-1. if flip else 1., 1, 1, 1]) @ np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    a = a @ np.diag([*spacing, 1])
    a[:3, 3] = origin
    return a


def world(affine, ijk): return np.asarray(ijk, float) @ affine[:3, :3].T + affine[:3, 3]


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize('flip,angle', [(False, 0.), (True, 0.), (True, 0.3)])
def test_class_volumes_are_counts_times_voxel_volume(flip, angle):
    rng = np.random.default_rng(0)
    shape = (30, 25, 12)
    lab = rng.choice(np.array([0, 1, 2], np.uint8), shape, p=[.6, .3, .1])
    hu = rng.integers(-200, 300, shape).astype(np.int16)
    aff = grid_affine(flip=flip, angle=angle)
    st = label_statistics(lab, CTVolume(hu, aff))
    ml = 0.7 * 0.9 * 3.0 / 1000
    assert st['voxel_ml'] == pytest.approx(ml)
    for name, m in dict(liver=lab > 0, liver_parenchyma=lab == 1, tumor=lab == 2).items():
        c = st['classes'][name]
        assert c['voxels'] == m.sum()
        assert c['volume_ml'] == pytest.approx(m.sum() * ml)
        assert c['mean_hu'] == pytest.approx(hu[m].mean())
    assert st['tumor_burden'] == pytest.approx((lab == 2).sum() / (lab > 0).sum())
    # JSON-ready: no numpy scalars, no NaN
    json.dumps(st, allow_nan=False)


def test_empty_labels_have_no_burden_and_no_lesions():
    st = label_statistics(np.zeros((5, 5, 3), np.uint8), CTVolume(np.zeros((5, 5, 3), np.int16), np.eye(4)))
    assert st['classes']['liver'] == dict(voxels=0, volume_ml=0., mean_hu=None)
    assert st['tumor_burden'] is None and st['n_lesions'] == 0 and st['lesions'] == []
    json.dumps(st, allow_nan=False)


def test_lesion_count_equals_26_connected_components():
    shape = (40, 40, 20)
    lab = np.zeros(shape, np.uint8)
    lab[2:38, 2:38, 2:18] = 1
    lab[5:10, 5:10, 5:8] = 2             # 75 voxels
    lab[10, 10, 8] = 2                   # touches the first only at a corner: the same lesion in 26-connectivity
    lab[20:30, 20:30, 10:15] = 2         # 500 voxels
    lab[32, 5, 3] = 2                    # a single voxel
    lab[5:8, 30:33, 14:16] = 2           # 18 voxels
    st = label_statistics(lab, CTVolume(np.zeros(shape, np.int16), grid_affine()))
    n = ndi.label(lab == 2, np.ones((3, 3, 3)))[1]
    assert n == 4 and st['n_lesions'] == n and len(st['lesions']) == n
    assert [l['voxels'] for l in st['lesions']] == [500, 76, 18, 1]          # largest first
    assert [l['lesion'] for l in st['lesions']] == [1, 2, 3, 4]
    assert sum(l['voxels'] for l in st['lesions']) == (lab == 2).sum()
    assert st['lesions'][-1]['diameter_mm'] == 0.


@pytest.mark.parametrize('r', [6., 20.])    # 20 mm: thousands of surface voxels, measured through the convex hull
def test_sphere_centre_and_diameter(r):
    aff = grid_affine(spacing=(0.8, 0.7, 2.0))
    shape = (70, 80, 30)
    centre = world(aff, [33.3, 41.6, 14.4])
    ijk = np.moveaxis(np.indices(shape), 0, -1)
    ball = np.linalg.norm(world(aff, ijk) - centre, axis=-1) <= r
    lab = ball.astype(np.uint8) * 2
    st = label_statistics(lab, CTVolume(np.where(ball, 45, 0).astype(np.int16), aff))
    (les,) = st['lesions']
    assert np.allclose(les['centre_ras_mm'], centre, atol=0.25)
    assert 2 * r - 2.0 <= les['diameter_mm'] <= 2 * r + 1e-6    # voxel centres lie inside the sphere
    assert les['volume_ml'] == pytest.approx(4 / 3 * np.pi * r ** 3 / 1000, rel=0.06)
    assert les['mean_hu'] == 45.
    # the same lesion measured over all pairs of its surface voxels
    surf = np.argwhere(ball & ~ndi.binary_erosion(ball))
    assert (r < 10) == (len(surf) <= 2000)
    brute = max(np.linalg.norm(world(aff, surf[i]) - world(aff, surf), axis=1).max() for i in range(len(surf)))
    assert les['diameter_mm'] == pytest.approx(brute, abs=1e-3)


def test_largest_diameter_flat_and_collinear_sets():
    rng = np.random.default_rng(3)
    flat = np.c_[rng.uniform(-10, 10, (3000, 2)), np.full(3000, 4.)]
    brute = max(np.linalg.norm(flat[i] - flat, axis=1).max() for i in range(len(flat)))
    assert largest_diameter(flat) == pytest.approx(brute)
    line = np.outer(np.linspace(0, 1, 2500), [3., 4., 0.])
    assert largest_diameter(line) == pytest.approx(5.)


def test_labels_in_another_voxel_order_and_bad_labels(tmp_path):
    vp, sp = write_lits_case(tmp_path, 0, seed=7, n_tumors=3, shape=(64, 64, 24))
    rp, rs = write_lits_case(tmp_path/'ras', 0, axcodes=('R', 'A', 'S'), seed=7, n_tumors=3, shape=(64, 64, 24))
    vol = read_nifti(vp)
    a = label_statistics(read_labels(sp).array, vol)
    b = label_statistics(read_labels(rs), vol)                  # a CTVolume in another order of the same grid
    assert a['classes'] == b['classes'] and a['lesions'] == b['lesions']
    with pytest.raises(LiverSegError, match='label values'):
        label_statistics(read_labels(sp).array * 3, vol)
    with pytest.raises(LiverSegError, match='labels have shape'):
        label_statistics(np.zeros((3, 3, 3), np.uint8), vol)


def test_statistics_json_and_csv_are_written_atomically(tmp_path):
    vp, sp = write_lits_case(tmp_path/'in', 0, seed=7, n_tumors=3, shape=(64, 64, 24))
    st = label_statistics(read_labels(sp).array, read_nifti(vp))
    out = tmp_path/'out'; out.mkdir()
    write_statistics(st, out/'volume-0.json')
    assert json.loads((out/'volume-0.json').read_text()) == st
    with pytest.raises(LiverSegError, match='exists'): write_statistics({}, out/'volume-0.json')
    assert json.loads((out/'volume-0.json').read_text()) == st
    write_statistics_table([st, st], out/'all.csv')
    t = pd.read_csv(out/'all.csv')
    assert list(t.case) == ['volume-0', 'volume-0'] and list(t.lesions) == [st['n_lesions']] * 2
    assert t.liver_volume_ml[0] == pytest.approx(st['classes']['liver']['volume_ml'])
    assert t.largest_lesion_diameter_mm[0] == pytest.approx(st['lesions'][0]['diameter_mm'])
    assert sorted(p.name for p in out.iterdir()) == ['all.csv', 'volume-0.json']   # no temporaries left
    assert statistics_table([]).empty


# ---------------------------------------------------------------- preview

def rendered(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def panel_pixels(fig, ax):
    "The rendered pixels inside `ax`"
    buf = rendered(fig)
    x0, y0, x1, y1 = ax.get_window_extent().extents
    H = buf.shape[0]
    return buf[int(round(H - y1)):int(round(H - y0)), int(round(x0)):int(round(x1))]


def liver_colour_columns(px):
    "Column positions (fractions of the panel's width) of pixels in the liver outline's colour"
    near = np.abs(px.astype(float) - LIVER_RGB).max(-1) < 40
    return np.argwhere(near)[:, 1] / px.shape[1]


@pytest.fixture(scope='module')
def lps_and_ras(tmp_path_factory):
    t = tmp_path_factory.mktemp('preview')
    out = {}
    for name, codes in (('LPS', None), ('RAS', ('R', 'A', 'S')), ('SRA', ('S', 'R', 'A'))):
        vp, sp = write_lits_case(t/name, 0, axcodes=codes, seed=7, n_tumors=3)
        out[name] = read_nifti(vp), read_labels(sp).array
    return out


@pytest.mark.parametrize('order', ['LPS', 'RAS', 'SRA'])
def test_preview_liver_on_the_left_spine_below_marks_in_place(lps_and_ras, order, tmp_path):
    vol, lab = lps_and_ras[order]
    fig = plot_preview(lab, vol, n=3)
    axs = [ax for ax in fig.axes if ax.images]
    assert len(axs) == 3
    for ax in axs:
        cols = liver_colour_columns(panel_pixels(fig, ax))
        assert len(cols) > 20 and np.median(cols) < 0.5        # the patient's right is on the image's left
        img = np.asarray(ax.images[0].get_array())
        assert np.argwhere(img >= 1)[:, 0].mean() / img.shape[0] > 0.5   # bone (the spine) in the lower half
        pos = {t.get_text(): t.get_position() for t in ax.texts if len(t.get_text()) == 1}
        assert pos['R'][0] < 0.5 < pos['L'][0] and pos['P'][1] < 0.5 < pos['A'][1]   # axes y points up
        assert any(t.get_text() == '5 cm' for t in ax.texts)
    p = write_preview(lab, vol, tmp_path/'p.png', n=3)
    im = np.asarray(Image.open(p))
    assert im.shape[:2] == rendered(fig).shape[:2]


def test_preview_same_picture_for_every_voxel_order(lps_and_ras):
    pics = [rendered(plot_preview(lab, vol, n=4, title='')) for vol, lab in lps_and_ras.values()]
    assert all(np.array_equal(pics[0], p) for p in pics[1:])


def test_preview_titles_are_slice_positions_and_scale_bar_is_5_cm(lps_and_ras):
    vol, lab = lps_and_ras['RAS']
    can = to_canonical(vol)
    fig = plot_preview(lab, vol, n=5)
    col_mm = can.spacing[0]
    liver_slices = np.flatnonzero((to_canonical(CTVolume(lab, vol.affine)).array > 0).any(axis=(0, 1)))
    for ax in (a for a in fig.axes if a.images):
        z = float(ax.get_title().split()[2])
        k = (z - can.affine[2, 3]) / can.affine[2, 2]
        assert abs(k - round(k)) < 0.05 and round(k) in liver_slices
        (bar,) = [l for l in ax.lines if l.get_gid() == 'scale_bar']
        assert np.ptp(bar.get_xdata()) * col_mm == pytest.approx(50.)


def test_preview_refuses_other_suffixes_and_keeps_existing(lps_and_ras, tmp_path):
    vol, lab = lps_and_ras['LPS']
    with pytest.raises(LiverSegError, match='png'): write_preview(lab, vol, tmp_path/'p.jpg')
    (tmp_path/'p.png').write_bytes(b'old')
    with pytest.raises(LiverSegError, match='exists'): write_preview(lab, vol, tmp_path/'p.png')
    assert (tmp_path/'p.png').read_bytes() == b'old'
    write_preview(lab, vol, tmp_path/'p.png', force=True, n=2)
    assert (tmp_path/'p.png').read_bytes()[:4] == b'\x89PNG'


# ---------------------------------------------------------------- DICOM SEG

@pytest.fixture(scope='module')
def chaos(tmp_path_factory):
    case = write_chaos_case(tmp_path_factory.mktemp('chaos')/'case', shape=(64, 56, 18), seed=4, n_tumors=3)
    vol, lab = read_chaos_case(case)
    assert (lab == 2).any() and (lab == 1).any()
    return case, vol, lab


@needs_highdicom
def test_seg_round_trip_phantom_series(chaos, tmp_path):
    case, vol, lab = chaos
    p = write_dicom_seg(lab, vol, tmp_path/'seg.dcm')
    assert np.array_equal(read_dicom_seg(p, vol), lab)
    assert np.array_equal(read_dicom_seg(p, case/'DICOM'), lab)     # the series given as its folder


@needs_highdicom
def test_seg_frames_belong_to_the_right_instances(chaos, tmp_path):
    "Checked with pydicom alone: each frame's referenced instance holds exactly that segment's pixels."
    case, vol, lab = chaos
    p = write_dicom_seg(lab, case/'DICOM', tmp_path/'seg.dcm')
    seg = pydicom.dcmread(p)
    assert seg.Modality == 'SEG' and seg.SegmentationType == 'BINARY'
    Z = lab.shape[2]
    # write_chaos_case numbers instances from the top: slice k (from the bottom) is InstanceNumber Z - k
    k_of = {ds.SOPInstanceUID: Z - int(ds.InstanceNumber) for ds in
            (pydicom.dcmread(f, stop_before_pixels=True) for f in (case/'DICOM').iterdir())}
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(k_of)
    frames = seg.pixel_array.reshape(-1, lab.shape[1], lab.shape[0])
    seen = set()
    for f, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        s = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = k_of[uid]
        assert np.array_equal(f.astype(bool), lab[:, :, k].T == s)
        seen.add((k, s))
    assert seen == {(k, s) for s in (1, 2) for k in range(Z) if (lab[:, :, k] == s).any()}
    segs = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert segs[1].SegmentLabel == 'liver' and segs[2].SegmentLabel == 'liver tumour'
    assert segs[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == '10200004'           # SCT Liver
    assert segs[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == '85756007'       # SCT Tissue
    assert segs[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == '108369006'          # SCT Neoplasm
    assert segs[2].SegmentedPropertyCategoryCodeSequence[0].CodeValue == '49755003'       # Morphologically Altered Structure
    assert segs[2].AnatomicRegionSequence[0].CodeValue == '10200004'


@needs_highdicom
def test_seg_empty_labels_and_refusals(chaos, tmp_path):
    case, vol, lab = chaos
    p = write_dicom_seg(np.zeros_like(lab), vol, tmp_path/'empty.dcm')
    assert read_dicom_seg(p, vol).sum() == 0
    with pytest.raises(LiverSegError, match='labels have shape'): write_dicom_seg(lab[:, :, 1:], vol, tmp_path/'a.dcm')
    with pytest.raises(LiverSegError, match='label values'): write_dicom_seg(lab * 2, vol, tmp_path/'b.dcm')
    shifted = CTVolume(vol.array, vol.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1.]]),
                       vol.header, vol.path)                    # a volume one slice off its files
    with pytest.raises(LiverSegError, match='do not match'): write_dicom_seg(lab, shifted, tmp_path/'c.dcm')
    with pytest.raises(LiverSegError, match='exists'): write_dicom_seg(lab, vol, p)
    with pytest.raises(LiverSegError, match='not a readable DICOM SEG'): read_dicom_seg(case/'masks'/'liver_GT_000.png', vol)
    assert sorted(x.name for x in tmp_path.iterdir()) == ['empty.dcm']


def test_missing_highdicom_says_what_to_install(chaos, tmp_path, monkeypatch):
    case, vol, lab = chaos
    monkeypatch.setitem(sys.modules, 'highdicom', None)      # `import highdicom` raises ImportError
    for call in (lambda: write_dicom_seg(lab, vol, tmp_path/'seg.dcm'), lambda: read_dicom_seg(tmp_path/'seg.dcm', vol)):
        with pytest.raises(LiverSegError) as e: call()
        msg = str(e.value)
        assert "pip install 'fastai-liver-seg[dicom-seg]'" in msg and '\n' not in msg and 'seg.dcm' in msg
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- real CT (skipped without the shared data)

@pytest.fixture(scope='module')
def real_series():
    if not (TSEG/'example_ct_dicom').is_dir():
        pytest.skip("../shared/data/real-ct-io/totalsegmentator_example not present (real CT series with a liver mask)")
    vol = read_dicom_series(TSEG/'example_ct_dicom')
    seg = read_labels(TSEG/'example_seg_dicom.nii.gz')          # on the series' grid, in dcm2niix's voxel order
    multi = from_canonical(to_canonical(seg).array, vol)
    lab = np.where(multi == 5, 1, 0).astype(np.uint8)            # TotalSegmentator's liver is label 5
    i, j, k = np.argwhere(lab == 1).mean(0).round().astype(int)
    g = np.ogrid[:lab.shape[0], :lab.shape[1], :lab.shape[2]]
    fake = ((g[0] - i) * 0.977) ** 2 + ((g[1] - j) * 0.977) ** 2 + ((g[2] - k) * 2.0) ** 2 <= 12 ** 2
    lab[fake & (lab == 1)] = 2                                   # a fake 12 mm tumour inside the liver
    return vol, lab


@needs_highdicom
def test_real_series_seg_round_trip(real_series, tmp_path):
    vol, lab = real_series
    assert vol.shape == (512, 512, 20) and (lab == 1).sum() > 10000 and (lab == 2).sum() > 100
    p = write_dicom_seg(lab, vol, tmp_path/'seg.dcm')
    back = read_dicom_seg(p, TSEG/'example_ct_dicom')
    assert back.dtype == np.uint8 and np.array_equal(back, lab)


def test_real_series_statistics_and_preview(real_series, tmp_path):
    vol, lab = real_series
    st = label_statistics(lab, vol)
    ml = 0.9765625 ** 2 * 2.0 / 1000
    assert st['classes']['liver']['volume_ml'] == pytest.approx((lab > 0).sum() * ml, rel=1e-4)
    assert 20 < st['classes']['liver']['mean_hu'] < 200 and st['n_lesions'] == 1
    assert st['lesions'][0]['diameter_mm'] == pytest.approx(24, abs=2.5)
    fig = plot_preview(lab, vol, n=2)
    for ax in (a for a in fig.axes if a.images):
        cols = liver_colour_columns(panel_pixels(fig, ax))
        assert len(cols) > 20 and np.median(cols) < 0.5         # a real liver: on the image's left
