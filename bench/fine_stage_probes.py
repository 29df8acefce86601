"""Probes of where the coarse-to-fine default loses held-out Dice, on the models of an `accuracy_epochs.py` run (session 12).

    python bench/fine_stage_probes.py oracle RUN            # stage 1's box replaced by the true liver's box
    python bench/fine_stage_probes.py fill RUN --epoch 10   # post-processing variants on the held-out slice predictions
    python bench/fine_stage_probes.py average RUN --epochs 9,10,11   # the fine stage's weights averaged over epochs
    python bench/fine_stage_probes.py batch-dice --work W [accuracy_epochs.py options]   # CE + Dice over the whole batch

RUN is an `accuracy_epochs.py` work folder (its `model`, `holdout`, `epochN.pth`, `mN` and `pred_eN`). `batch-dice` runs
`accuracy_epochs.py` with both stages trained on cross-entropy plus fastai's `DiceLoss` taken over the batch (nnU-Net's
"batch Dice") instead of per slice. `oracle` predicts with `predict_slices`' defaults, as `liver-seg predict` made RUN's
`pred_eN`: since session 13 both include the tumour rule (`tumor_by_contrast`), so compare a RUN predicted by the
same liver_seg version. Everything is written under RUN or W, outside the repository. Measured, never asserted.
"""
import argparse, json, os, runpy, shutil, sys, warnings
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from cpuflags import cpu_summary  # noqa: E402

IRCADB = BENCH.parents[1]/'shared'/'data'/'ircadb-hu'


def held_out(run):
    "The held-out cases: (case, rows of its images and true masks in slice order)"
    from liver_seg.slices import find_slice_pairs
    return list(find_slice_pairs(run/'holdout').groupby('case', sort=False))


def stack(masks, encoding, folder=None):
    "N x H x W labels of mask files (or of the files of the same names in `folder`)"
    import numpy as np
    from liver_seg.slices import read_mask
    return np.stack([read_mask(Path(folder)/Path(m).name if folder else m, encoding) for m in masks])


def oracle(run, epoch):
    "Predict the held-out slices with the true liver's box (the model's own margins) in place of stage 1's, and score"
    import numpy as np
    import liver_seg.predictor as P
    from liver_seg.predict import predict_slices
    from liver_seg.crops import liver_box, grow_box
    model, out = run/f'm{epoch}', run/f'pred_oracle_e{epoch}'
    cas = json.loads((model/'config.json').read_text())['cascade']
    if out.exists(): shutil.rmtree(out)
    out.mkdir()
    for case, rows in held_out(run):
        fg = stack(rows['mask'], '127') > 0
        def true_region(pred, batch_of, n, batch_size=None, fg=fg):
            z0, z1, *plane = liver_box(fg, cas['margin'], cas['z_margin'], square=False)
            return (z0, z1, *grow_box(plane, 0, fg.shape[1:]))
        P.liver_region = true_region  # `slab_labels` looks it up in its module at each call
        src = out/f'.in{case}'/'images'; src.mkdir(parents=True)
        for f in rows['image']: os.symlink(Path(f).resolve(), src/Path(f).name)
        predict_slices(model, src, out/f'.pred{case}', progress=False)
        for f in (out/f'.pred{case}').iterdir(): shutil.move(str(f), out/f.name)
        shutil.rmtree(out/f'.in{case}'); shutil.rmtree(out/f'.pred{case}')
    for name, pred in (('stage 1 box', run/f'pred_e{epoch}'), ('true box', out)): print(f'{name:12s}', scores(pred, run))


def scores(pred, run):
    "Per-case (liver, tumour) Dice of a slice-folder prediction of the held-out cases, and their means"
    from liver_seg.evaluate import overlap_metrics
    res = {}
    for case, rows in held_out(run):
        g, p = stack(rows['mask'], '127'), stack(rows['mask'], '012', pred)
        res[case] = (overlap_metrics(p > 0, g > 0)['dice'], overlap_metrics(p == 2, g == 2)['dice'])
    means = [sum(v[i] for v in res.values())/len(res) for i in (0, 1)]
    return ' '.join(f'liver {c} {l:.4f}' for c, (l, _) in res.items()) + f' (mean {means[0]:.4f}); ' + \
           ' '.join(f'tumour {c} {t:.3f}' for c, (_, t) in res.items()) + f' (mean {means[1]:.3f})'


def fill(run, epoch):
    "Each held-out case's predicted slices stacked and post-processed (3D holes, per-slice holes, per-slice holes as tumour)"
    import numpy as np
    from scipy import ndimage as ndi
    from liver_seg.postprocess import postprocess
    def holes_as_tumor(lab):
        out = lab.copy()
        for k in range(lab.shape[2]):
            fg = lab[:, :, k] > 0
            out[:, :, k][ndi.binary_fill_holes(fg) & ~fg] = 2
        return out
    variants = {'as predicted': lambda l: l, 'postprocess (3D holes)': postprocess,
                'postprocess, holes per slice': lambda l: postprocess(l, fill_holes='2d'),
                'postprocess, then holes per slice as tumour': lambda l: holes_as_tumor(postprocess(l))}
    from PIL import Image
    out = run/'.fill'
    for name, f in variants.items():
        out.mkdir(exist_ok=True)
        for case, rows in held_out(run):
            lab = f(np.moveaxis(stack(rows['mask'], '012', run/f'pred_e{epoch}'), 0, -1))  # X x Y x slices, as `postprocess` takes
            for k, m in enumerate(rows['mask']): Image.fromarray(lab[:, :, k]).save(out/Path(m).name)
        print(f'{name:44s}', scores(out, run))
        shutil.rmtree(out)


def average(run, epochs):
    "The fine stage's weights (and batch-norm statistics) averaged over `epochs`, scored like `accuracy_real.py`"
    import torch
    from accuracy_real import score_model
    from liver_seg.model import build_model, write_model_files
    model = run/'model'
    cfg = json.loads((model/'config.json').read_text())
    sds = [torch.load(run/f'epoch{e}.pth', weights_only=True) for e in epochs]
    avg = {k: (sum(sd[k].double() for sd in sds)/len(sds)).to(v.dtype) if v.is_floating_point() else sds[-1][k] for k, v in sds[0].items()}
    tag = 'avg' + '_'.join(map(str, epochs))
    d = run/f'm_{tag}'
    for p in (d, run/f'pred_{tag}', run/f'dicom_pred_{tag}'):
        if p.exists(): shutil.rmtree(p)
    d.mkdir(); shutil.copy(model/'config.json', d/'config.json'); (d/'coarse').symlink_to(model/'coarse')
    net = build_model(cfg); net.load_state_dict(avg); net.eval(); write_model_files(net, cfg, d)
    a = SimpleNamespace(predict_args='', ircadb=str(IRCADB) if IRCADB.is_dir() else None, ircadb_holdout='3Dircadb1.1')
    df, s, _ = score_model(d, run, a, tag=f'_{tag}')
    print(f'epochs {epochs}:', {k: round(float(v), 4) for k, v in s.items()}, f'slice means: liver {df.liver_dice.mean():.4f}, tumour {df.tumor_dice.mean():.3f}')


def batch_dice(argv):
    "accuracy_epochs.py with 'ce+dice' meaning cross-entropy plus fastai's `DiceLoss` over the whole batch"
    import liver_seg.train as T, liver_seg.metrics as M
    class CEBatchDice(M.CEDiceLoss):
        def __call__(self, pred, targ):  # classes first, then one 'image' of B x H x W: fastai's Dice sums over the batch too
            return self.ce(pred, targ) + self.dice_weight*self.dice(pred.transpose(0, 1).unsqueeze(0), targ.unsqueeze(0))
    own = T.get_loss
    T.get_loss = lambda name='ce': CEBatchDice(axis=1) if name == 'ce+dice' else own(name)
    sys.argv = [str(BENCH/'accuracy_epochs.py')] + argv
    runpy.run_path(str(BENCH/'accuracy_epochs.py'), run_name='__main__')


def main():
    if len(sys.argv) > 1 and sys.argv[1] == 'batch-dice': return batch_dice(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('probe', choices=['oracle', 'fill', 'average'])
    ap.add_argument('run', type=Path, help='an accuracy_epochs.py work folder')
    ap.add_argument('--epoch', type=int, default=None, help='oracle, fill: the epoch model (default: the kept one)')
    ap.add_argument('--epochs', default='9,10,11', help='average: the epochs to average')
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    epoch = a.epoch if a.epoch is not None else json.loads((a.run/'model'/'config.json').read_text())['recipe']['best_epoch']
    print(f'[{cpu_summary()}]')
    if a.probe == 'oracle': oracle(a.run, epoch)
    elif a.probe == 'fill': fill(a.run, epoch)
    else: average(a.run, [int(e) for e in a.epochs.split(',')])


if __name__ == '__main__': main()
