"""Held-out Dice of every late epoch of one training run: how much the checkpoint choice matters.

    python bench/accuracy_epochs.py --work /tmp/liver_seg_epochs --size 128 --epochs 24 --keep-from 12 [--last-cross]

Trains like `liver-seg train TRAIN --no-pretrained` (the Python API, `liver_seg.train.train`, the same code) on cases
0-5 of ../shared/data/ct-slices with a callback that also saves the weights of every epoch from `--keep-from` on, then
predicts the held-out cases (6, 7) with each saved epoch (`liver-seg predict`) and scores them (`liver-seg evaluate`).
Prints, per epoch, the held-out liver and tumour Dice beside the validation Dice that the checkpoint rule saw, and
which epoch the rule kept. Everything is written under `--work`, outside the repository. Measured, never asserted.
"""
import argparse, json, shutil, subprocess, sys, time, warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy_real import REAL, ROOT, link_cases, case_of  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=str(REAL))
    p.add_argument('--holdout', default='6,7')
    p.add_argument('--work', default='/tmp/liver_seg_epochs')
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--epochs', type=int, default=24)
    p.add_argument('--keep-from', type=int, default=12, help='save and score every epoch from this one (0-based)')
    p.add_argument('--last-cross', action='store_true', help="keep fastai's full-resolution ResBlock (default here: off)")
    p.add_argument('--valid-cases', default=None, help='comma-separated validation cases for the checkpoint rule (default: train\'s own choice)')
    p.add_argument('--train-kwargs', default='{}', help='more `train` options as JSON, e.g. \'{"loss": "ce+dice"}\'')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    import torch, pandas as pd
    from fastai.callback.core import Callback
    from fastai.torch_core import get_model
    from liver_seg.train import train
    from liver_seg.model import model_state, write_model_files, build_model
    data, work = Path(a.data), Path(a.work).resolve()
    if not (data/'images').is_dir(): sys.exit(f"{data}: no images/ folder (the real slices are not present)")
    if work == ROOT or ROOT in work.parents: sys.exit(f"{work}: inside the repository; use a folder outside it")
    hold = {c.strip() for c in a.holdout.split(',')}
    cases = {case_of(f.stem) for f in (data/'images').iterdir()}
    if work.exists(): shutil.rmtree(work)
    work.mkdir(parents=True)
    link_cases(data, work/'train', cases - hold); link_cases(data, work/'holdout', hold)

    class KeepEpochs(Callback):
        order = 95
        def after_epoch(self):
            if self.epoch >= a.keep_from: torch.save(model_state(get_model(self.learn.model)), work/f'epoch{self.epoch}.pth')

    t0 = time.time()
    valid = None if a.valid_cases is None else [c.strip() for c in a.valid_cases.split(',')]
    m = train(work/'train', work/'model', size=a.size, epochs=a.epochs, pretrained=False, last_cross=a.last_cross,
              valid_cases=valid, cbs=[KeepEpochs()], **json.loads(a.train_kwargs))
    cfg = json.loads((m/'config.json').read_text())
    hist = pd.read_csv(m/'history.csv')
    print(f"trained in {(time.time() - t0)/60:.1f} min; size {a.size}, {a.epochs} epochs, last_cross {a.last_cross}; "
          f"options {a.train_kwargs}; validation {cfg['split']['valid_cases']}; the checkpoint rule kept epoch {cfg['recipe']['best_epoch']}", flush=True)
    for f in sorted(work.glob('epoch*.pth'), key=lambda q: int(q.stem[5:])):
        ep = int(f.stem[5:])
        d = work/f'm{ep}'; d.mkdir()
        net = build_model(cfg); net.load_state_dict(torch.load(f, weights_only=True)); net.eval()
        write_model_files(net, cfg, d)
        for cmd in (['predict', d, work/'holdout'/'images', work/f'pred{ep}'],
                    ['evaluate', work/f'pred{ep}', work/'holdout'/'masks', '--csv', work/f'eval{ep}.csv']):
            subprocess.run(['liver-seg', *map(str, cmd)], capture_output=True, check=True)
        df = pd.read_csv(work/f'eval{ep}.csv')
        v = hist.iloc[ep]
        print(f"epoch {ep:2d}{' (kept)' if ep == cfg['recipe']['best_epoch'] else '       '}  validation liver {v.liver_dice:.3f} "
              f"tumour {v.tumor_dice:.3f} | held out: " +
              '  '.join(f"case {c} liver {l:.4f} tumour {t:.4f}" for c, l, t in zip(df['case'], df['liver_dice'], df['tumor_dice'])),
              flush=True)


if __name__ == '__main__':
    main()
