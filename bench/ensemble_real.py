"""Held-out Dice of several model folders averaged (mean of their softmax per slice) against each alone.

    python bench/ensemble_real.py MODEL_A MODEL_B [--holdout 6,7] [--work /tmp/liver_seg_ensemble]

The model folders come from `accuracy_real.py` or `accuracy_epochs.py` runs (e.g. the default recipe with two seeds).
The held-out cases of ../shared/data/ct-slices are linked into `--work` (outside the repository), every model and the
average predict them with `Predictor.scores` in batches of 16 slices of one case, logits resized to 512 x 512 before
the argmax as `predict` does, and `liver_seg.evaluate` scores each. Measured, never asserted.
"""
import argparse, shutil, sys, warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy_real import REAL, ROOT, link_cases  # noqa: E402


def predict_mean(preds, rows, out):
    "Write one 0/1/2 mask PNG per slice: argmax of the mean softmax of `preds` (Predictors), per case in batches of 16"
    import numpy as np
    from PIL import Image
    from liver_seg.predict import _slice_images
    from scipy.special import softmax
    from liver_seg.predictor import _resize_maps, class_labels
    out.mkdir(parents=True)
    for _, case in rows.groupby('case', sort=False):
        for i in range(0, len(case), 16):
            chunk = case.iloc[i:i + 16]
            imgs = np.stack(_slice_images(preds[0], chunk))
            p = sum(softmax(pr.scores(imgs), 1) for pr in preds) / len(preds)
            lab = class_labels(_resize_maps(p, imgs.shape[1:3]))  # as `Predictor.labels`: resized to the slice, then argmax
            for img, l in zip(chunk['image'], lab): Image.fromarray(l).save(out/f"{Path(img).stem}.png")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('models', nargs='+', help='model folders')
    p.add_argument('--data', default=str(REAL))
    p.add_argument('--holdout', default='6,7')
    p.add_argument('--work', default='/tmp/liver_seg_ensemble')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    from liver_seg.predict import Predictor
    from liver_seg.io import find_slice_pairs
    from liver_seg.evaluate import evaluate
    data, work = Path(a.data), Path(a.work).resolve()
    if not (data/'images').is_dir(): sys.exit(f"{data}: no images/ folder (the real slices are not present)")
    if work == ROOT or ROOT in work.parents: sys.exit(f"{work}: inside the repository; use a folder outside it")
    if work.exists(): shutil.rmtree(work)
    link_cases(data, work/'holdout', {c.strip() for c in a.holdout.split(',')})
    rows = find_slice_pairs(work/'holdout')
    preds = [Predictor.from_folder(m) for m in a.models]
    runs = [(m, [pr]) for m, pr in zip(a.models, preds)] + [('mean of all', preds)]
    for k, (name, ps) in enumerate(runs):
        s = evaluate(predict_mean(ps, rows, work/f'pred{k}'), work/'holdout'/'masks', verbose=False)
        print(f"{name}: " + '  '.join(f"case {r.case} liver {r.liver_dice:.4f} tumour {r.tumor_dice:.4f} "
                                      f"(lesions {r.tumor_lesions_found}/{r.tumor_lesions_true}, {r.tumor_lesions_false} false)"
                                      for r in s.itertuples()), flush=True)


if __name__ == '__main__': main()
