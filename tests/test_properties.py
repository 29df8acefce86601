"""Properties that must hold for every input, checked with hypothesis: slice names, mask encodings, HU windows,
and the segmentation metrics of `liver_seg.evaluate` and `liver_seg.metrics`."""
import importlib, math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def need(module, *names):
    "The module, or skip with a reason when it (or one of `names` in it) is not there yet"
    try: m = importlib.import_module(module)
    except ImportError as e: pytest.skip(f"{module} not importable ({e})")
    missing = [n for n in names if not hasattr(m, n)]
    if missing: pytest.skip(f"{module} has no {', '.join(missing)} yet")
    return m


# ================================================================== slice names

# case ids: anything a file name can hold (no path separator, no NUL), at least one character
case_ids = st.text(st.characters(blacklist_characters='/\\\x00', blacklist_categories=('Cs',)), min_size=1, max_size=30)
slice_numbers = st.integers(0, 10**6)


@SETTINGS
@given(case=case_ids, n=slice_numbers, width=st.integers(0, 6))
@example(case='0', n=46, width=0)
@example(case='volume-3_slice', n=12, width=4)
@example(case='a_1_2', n=0, width=0)
def test_slice_name_round_trip(case, n, width):
    "f'{case}_{n}' (also zero-padded, as `prepare` writes it) parses back to (case, n)"
    io = need('liver_seg.io', 'parse_slice_name')
    assert io.parse_slice_name(f"{case}_{n:0{width}d}" if width else f"{case}_{n}") == (case, n)


odd_stems = st.one_of(
    st.text(max_size=20),
    st.builds(lambda a, d: f"{a}_{d}", st.text(max_size=8),
              st.text(st.characters(whitelist_categories=('Nd', 'No', 'Nl')), min_size=1, max_size=3)))


@SETTINGS
@given(stem=odd_stems)
@example(stem='case_\u00b2')      # superscript two: str.isdigit() is True, int() refuses it
@example(stem='nounderscore')
@example(stem='_5')
@example(stem='a_')
def test_slice_name_parses_or_refuses_cleanly(stem):
    "Any stem either parses to (case, int) that spells the stem again, or raises LiverSegError naming it"
    io = need('liver_seg.io', 'parse_slice_name', 'LiverSegError')
    try: case, n = io.parse_slice_name(stem)
    except io.LiverSegError as e:
        assert str(e).startswith(f"{stem}: ")
        return
    assert isinstance(n, int) and n >= 0 and case
    assert stem.startswith(case + '_') and int(stem[len(case) + 1:]) == n


# ================================================================== mask encodings

LUT127 = np.array([0, 127, 255], np.uint8)
label_maps = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                        elements=st.sampled_from([0, 1, 2]))


@SETTINGS
@given(labels=label_maps)
def test_decode_012_is_identity(labels):
    io = need('liver_seg.io', 'decode_mask')
    out = io.decode_mask(labels)
    assert out.dtype == np.uint8 and np.array_equal(out, labels)


@SETTINGS
@given(labels=label_maps)
def test_decode_127_round_trip(labels):
    "0/127/255 masks decode back to 0/1/2: always with encoding='127', and when detected from the values"
    io = need('liver_seg.io', 'decode_mask')
    enc = LUT127[labels]
    assert np.array_equal(io.decode_mask(enc, 'm.png', '127'), labels)
    out = io.decode_mask(enc, 'm.png')
    if 1 in labels or 2 not in labels: assert np.array_equal(out, labels)
    else:  # tumour only, no liver: {0, 255} is read as the liver-only encoding (DESIGN: 0/255 is liver only)
        assert np.array_equal(out, (labels > 0).astype(np.uint8))


@SETTINGS
@given(liver=hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)))
def test_decode_255_is_liver(liver):
    io = need('liver_seg.io', 'decode_mask')
    assert np.array_equal(io.decode_mask(liver.astype(np.uint8)*255), liver.astype(np.uint8))


@SETTINGS
@given(labels=label_maps, enc=st.sampled_from(['012', '127']))
def test_decode_equal_rgb_channels_as_gray(labels, enc):
    io = need('liver_seg.io', 'decode_mask')
    gray = labels if enc == '012' else LUT127[labels]
    assert np.array_equal(io.decode_mask(np.stack([gray]*3, -1)), io.decode_mask(gray))


ENCODINGS = [{0, 1, 2}, {0, 255}, {0, 127, 255}]
any_masks = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
                       elements=st.one_of(st.sampled_from([0, 1, 2, 127, 255]), st.integers(0, 255)))


@SETTINGS
@given(a=any_masks)
@example(a=np.array([[0, 50]], np.uint8))
@example(a=np.array([[0, 1, 255]], np.uint8))
@example(a=np.array([[1, 127]], np.uint8))
def test_decode_refuses_values_outside_every_encoding(a):
    "Values that fit no encoding raise LiverSegError naming the file; values that fit one decode into {0, 1, 2}"
    io = need('liver_seg.io', 'decode_mask', 'LiverSegError')
    vals = set(np.unique(a).tolist())
    if any(vals <= e for e in ENCODINGS):
        out = io.decode_mask(a, 'm.png')
        assert out.shape == a.shape and set(np.unique(out).tolist()) <= {0, 1, 2}
        assert np.array_equal(out > 0, a > 0)  # background stays background, foreground stays foreground
    else:
        with pytest.raises(io.LiverSegError) as e: io.decode_mask(a, 'm.png')
        assert str(e.value).startswith('m.png: ') and '\n' not in str(e.value)


# ================================================================== HU windows

def hu_slices(lo=-1024, hi=3071, max_side=20, max_z=3):
    return hnp.arrays(np.int16, st.tuples(st.integers(2, max_side), st.integers(2, max_side), st.integers(1, max_z)),
                      elements=st.integers(lo, hi))


@SETTINGS
@given(vol=st.one_of(hu_slices(), hu_slices(-32768, 32767)))
@example(vol=np.full((4, 5, 1), 40, np.int16))          # a constant slice
@example(vol=np.arange(-1000, 1000, 50, dtype=np.int16).reshape(5, 8, 1))
def test_volume_channels_equal_fastai_slice_channels(vol):
    "The vectorised channels are the fastai reference's pixels, slice by slice, in display orientation"
    w = need('liver_seg.windows', 'slice_channels', 'volume_channels')
    io = need('liver_seg.io', 'to_display')
    fast = w.volume_channels(vol)
    assert fast.dtype == np.uint8 and fast.shape == (vol.shape[2], vol.shape[1], vol.shape[0], 3)
    for k in range(vol.shape[2]):
        ref = w.slice_channels(io.to_display(vol[:, :, k]))
        assert np.array_equal(fast[k], ref), f"slice {k}: {np.argwhere(fast[k] != ref)[:5].tolist()} differ"


@SETTINGS
@given(vol=hnp.arrays(np.float32, st.tuples(st.integers(2, 16), st.integers(2, 16), st.just(1)),
                      elements=st.floats(-1024, 3071, width=32)))
def test_volume_channels_equal_fastai_on_float_hu(vol):
    "Float HU (rescaled DICOM) goes the float path: still fastai's pixels"
    w = need('liver_seg.windows', 'slice_channels', 'volume_channels')
    io = need('liver_seg.io', 'to_display')
    assert np.array_equal(w.volume_channels(vol)[0], w.slice_channels(io.to_display(vol[:, :, 0])))


@SETTINGS
@given(hu=hnp.arrays(np.int16, st.tuples(st.just(1), st.integers(1, 24), st.integers(1, 24)), elements=st.integers(-1500, 3071)),
       win=st.sampled_from(['liver', 'custom', 'abdomen_soft', 'lungs', 'brain']))
def test_windowed_values_are_monotone_in_hu(hu, win):
    "Every channel maps higher HU to an equal or higher byte; below the window is 0, above it 255"
    w = need('liver_seg.windows', 'display_channels', 'get_windows')
    (width, level), = w.get_windows([win])
    ch = w.display_channels(hu, windows=[win], freqhist=True)[0]
    h = hu[0].ravel()
    order = np.argsort(h, kind='stable')
    for c in range(ch.shape[-1]):
        v = ch[..., c].ravel()[order].astype(int)
        assert (np.diff(v) >= 0).all(), f"channel {c} not monotone"
        assert (np.diff(h[order]) > 0)[np.diff(v) > 0].all()  # a step up only where HU steps up
    v = ch[..., 0].ravel()
    assert (v[h <= level - width//2] == 0).all() and (v[h >= level + width//2] == 255).all()


# ================================================================== metrics

masks3d = hnp.arrays(bool, st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4)))
labels3d = st.integers(1, 4).flatmap(lambda z: st.tuples(
    *[hnp.arrays(np.uint8, (6, 7, z), elements=st.sampled_from([0, 1, 2]))]*2))
spacings = st.tuples(*[st.floats(0.3, 3.0)]*3)


@SETTINGS
@given(pair=masks3d.flatmap(lambda a: st.tuples(st.just(a), hnp.arrays(bool, a.shape))))
def test_dice_symmetric_bounded_and_iou_relation(pair):
    ev = need('liver_seg.evaluate', 'overlap_metrics')
    p, g = pair
    a, b = ev.overlap_metrics(p, g), ev.overlap_metrics(g, p)
    assert 0 <= a['dice'] <= 1 and math.isclose(a['dice'], b['dice'], abs_tol=1e-12)
    assert math.isclose(a['iou'], a['dice']/(2 - a['dice']), abs_tol=1e-9)
    assert math.isclose(a['voe'], 1 - a['iou'], abs_tol=1e-12)
    if p.any() and g.any(): assert math.isclose(a['precision'], b['recall'], abs_tol=1e-12)
    s = ev.overlap_metrics(p, p)
    assert s['dice'] == 1 and s['iou'] == 1 and s['voe'] == 0


@SETTINGS
@given(m=masks3d, sp=spacings)
def test_distances_zero_on_identical_masks(m, sp):
    ev = need('liver_seg.evaluate', 'distance_metrics')
    d = ev.distance_metrics(m, m.copy(), sp)
    assert d['hd95_mm'] == 0 and d['assd_mm'] == 0


@SETTINGS
@given(pair=masks3d.flatmap(lambda a: st.tuples(st.just(a), hnp.arrays(bool, a.shape))), sp=spacings)
def test_distances_symmetric_and_bounded(pair, sp):
    ev = need('liver_seg.evaluate', 'distance_metrics')
    p, g = pair
    assume(p.any() and g.any())
    a, b = ev.distance_metrics(p, g, sp), ev.distance_metrics(g, p, sp)
    diag = math.sqrt(sum(((n - 1)*s)**2 for n, s in zip(p.shape, sp)))
    for k in ('hd95_mm', 'assd_mm'):
        assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9)
        assert 0 <= a[k] <= diag + 1e-9


@SETTINGS
@given(pair=labels3d, sp=spacings)
def test_case_metrics_properties(pair, sp):
    "Per-case liver and tumour metrics: symmetric Dice in [0, 1], IoU = D/(2-D), perfect on identical labels"
    ev = need('liver_seg.evaluate', 'case_metrics')
    p, g = pair
    a, b = ev.case_metrics(p, g, sp), ev.case_metrics(g, p, sp)
    for c in ('liver', 'tumor'):
        d = a[f'{c}_dice']
        assert 0 <= d <= 1 and math.isclose(d, b[f'{c}_dice'], abs_tol=1e-12)
        assert math.isclose(a[f'{c}_iou'], d/(2 - d), abs_tol=1e-9)
    s = ev.case_metrics(p, p.copy(), sp)
    for c, m in (('liver', p > 0), ('tumor', p == 2)):
        assert s[f'{c}_dice'] == 1 and s[f'{c}_iou'] == 1
        assert s[f'{c}_hd95_mm'] == 0 and s[f'{c}_assd_mm'] == 0
        assert math.isclose(s[f'{c}_volume_ml'], m.sum()*np.prod(sp)/1000, rel_tol=1e-9)
    assert s['tumor_lesions_found'] == s['tumor_lesions_true'] and s['tumor_lesions_false'] == 0


@SETTINGS
@given(pair=labels3d, cut=st.integers(0, 4), kind=st.sampled_from(['dice', 'iou', 'precision', 'recall']))
def test_training_metric_matches_evaluation(pair, cut, kind):
    """`liver_seg.metrics.ClassOverlap` (validation, accumulated over batches) gives the pooled value that
    `liver_seg.evaluate.overlap_metrics` gives on the whole stack, whatever the batch split"""
    mt = need('liver_seg.metrics', 'ClassOverlap', 'score')
    ev = need('liver_seg.evaluate', 'overlap_metrics')
    import torch
    p, g = (torch.from_numpy(a.transpose(2, 0, 1).astype(np.int64)) for a in pair)  # N x H x W slices
    logits = torch.nn.functional.one_hot(p, 3).permute(0, 3, 1, 2).float()
    cut = min(cut, len(p))
    batches = [(logits[:cut], g[:cut]), (logits[cut:], g[cut:])]
    batches = [b for b in batches if len(b[0])]
    for c in (1, 2):
        got = mt.score(mt.ClassOverlap(c, kind), batches)
        ref = ev.overlap_metrics(pair[0] == c, pair[1] == c)[kind]
        pc, gc = (pair[0] == c).sum(), (pair[1] == c).sum()
        if pc == 0 and gc == 0: assert got == 1 and ref == 1
        elif kind == 'precision' and pc == 0 or kind == 'recall' and gc == 0: assert got == 0 and math.isnan(ref)
        else: assert math.isclose(got, ref, abs_tol=1e-9), (c, kind, got, ref)
