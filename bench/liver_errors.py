"""Where a held-out liver loses its Dice: how far its errors lie from the true edge, and what the fine stage's size allows.

    python bench/liver_errors.py PRED_MASKS TRUE_MASKS [--sizes 128,160,256]

PRED_MASKS is `liver-seg predict MODEL SLICES/images PRED_MASKS`' output, TRUE_MASKS the slices' masks (any encoding
`liver_seg.slices.read_mask` reads); each case is the stack of its slices in slice order. Per case: false positive and
false negative pixels of the liver (liver and tumour together) by their distance from the true liver's edge, then a
ceiling: the truth's own liver box (5% margins, as `predict`'s), squished to each size, resized back bilinearly as
`predict` resizes logits, and thresholded, scored against the truth. Measured, never asserted.
"""
import argparse, sys
from pathlib import Path
import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from liver_seg.slices import read_mask  # noqa: E402
from liver_seg.crops import liver_box  # noqa: E402
from liver_seg.predictor import _resize  # noqa: E402
from liver_seg.evaluate import overlap_metrics  # noqa: E402

BANDS = [(0, 2), (2, 5), (5, 10), (10, 30), (30, np.inf)]


def stacks(pred_dir, true_dir):
    "(case, predicted foreground, true foreground) per case, slices ordered by their number"
    files = sorted(Path(pred_dir).glob('*.png'), key=lambda f: (f.stem.rsplit('_', 1)[0], int(f.stem.rsplit('_', 1)[1])))
    for case in dict.fromkeys(f.stem.rsplit('_', 1)[0] for f in files):
        fs = [f for f in files if f.stem.rsplit('_', 1)[0] == case]
        yield case, np.stack([read_mask(f) > 0 for f in fs]), np.stack([read_mask(Path(true_dir)/f.name) > 0 for f in fs])


def ceiling(truth, size):
    "Dice of the truth squished from its box to `size` px and back, as the fine stage's logits come back"
    z0, z1, r0, r1, c0, c1 = liver_box(truth, margin=0.05, z_margin=2, square=False)
    back = np.zeros_like(truth)
    for k in range(z0, z1):  # `_resize`: the bilinear resize `Predictor.labels` gives the logits on their way back
        small = _resize(truth[k, r0:r1, c0:c1].astype(np.float32), (size, size))
        back[k, r0:r1, c0:c1] = _resize(small, (r1 - r0, c1 - c0)) > 0.5
    return overlap_metrics(back, truth)['dice']


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('pred'); ap.add_argument('truth'); ap.add_argument('--sizes', default='128,160,256')
    a = ap.parse_args()
    for case, p, t in stacks(a.pred, a.truth):
        fp, fn = p & ~t, t & ~p
        d_out, d_in = ndi.distance_transform_edt(~t), ndi.distance_transform_edt(t)
        bands = lambda d, err: ' / '.join(f"{int(((d[err] >= lo) & (d[err] < hi)).sum()):,}" for lo, hi in BANDS)
        print(f"case {case}: liver Dice {overlap_metrics(p, t)['dice']:.4f}, true {int(t.sum()):,} px; "
              f"false positives by distance from the edge <2 / 2-5 / 5-10 / 10-30 / 30+ px: {bands(d_out, fp)} ({int(fp.sum()):,}); "
              f"false negatives: {bands(d_in, fn)} ({int(fn.sum()):,})")
        print('  ceiling: ' + ', '.join(f"{s} px {ceiling(t, int(s)):.4f}" for s in a.sizes.split(',')))


if __name__ == '__main__':
    main()
