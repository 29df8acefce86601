"""Held-out Dice of every late epoch of one training run, and which epoch each checkpoint rule would keep.

    python bench/accuracy_epochs.py --work /tmp/liver_seg_epochs --keep-from 5 \\
        --ircadb ../shared/data/ircadb-hu --ircadb-holdout 3Dircadb1.1 --train-kwargs '{"valid_cases": ["5"], "seed": 1}'

Sets up the same split as `accuracy_real.py` (its options `--holdout`, `--ircadb`, `--ircadb-holdout`, `--work`), then
trains like `liver-seg train TRAIN... --no-pretrained` through the Python API (`liver_seg.train.train`, the code the
command runs; `--train-kwargs` are its options as JSON) with a callback that also saves the fine stage's weights of
every epoch from `--keep-from` on. Each saved epoch becomes a model folder (the run's config and coarse stage, that
epoch's weights), predicted and scored on the held-out slices and DICOM series exactly as `accuracy_real.py` scores a
model. Prints, per epoch, the validation Dice the checkpoint rules see beside the held-out Dice, then the epoch that
each rule of `train`'s `monitor` keeps (`liver_seg.train.MONITORS`), from epoch 0 and from the run's `min_epoch`
(`--only-kept` scores just those epochs). Everything is written under
`--work`, outside the repository. Measured, never asserted.
"""
import json, shutil, sys, time, warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy_real import parser, prepare_work, score_model  # noqa: E402
from cpuflags import cpu_summary  # noqa: E402

def main():
    p = parser()
    p.add_argument('--keep-from', type=int, default=5, help='save and score every fine-stage epoch from this one (0-based)')
    p.add_argument('--train-kwargs', default='{}', help='`train` options as JSON, e.g. \'{"valid_cases": ["5"], "seed": 1}\'')
    p.add_argument('--only-kept', action='store_true', help='score only the saved epochs that some checkpoint rule keeps (with min_epoch 0 or the run\'s)')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    import torch, pandas as pd
    from fastai.callback.core import Callback
    from fastai.torch_core import get_model
    from liver_seg.train import train, MONITORS, _kept_epoch
    from liver_seg.model import model_state, write_model_files, build_model
    work, folders = prepare_work(a)

    class KeepEpochs(Callback):  # `train` hands `cbs` to the fine stage only
        order = 95
        def after_epoch(self):
            if self.epoch >= a.keep_from: torch.save(model_state(get_model(self.learn.model)), work/f'epoch{self.epoch}.pth')

    t0 = time.time()
    model = train(folders, work/'model', pretrained=False, cbs=[KeepEpochs()], **json.loads(a.train_kwargs))
    cfg = json.loads((model/'config.json').read_text())
    hist = pd.read_csv(model/'history.csv')
    print(f"trained in {(time.time() - t0)/60:.1f} min (fit {cfg['recipe']['train_seconds']/60:.1f} min); options {a.train_kwargs}; "
          f"validation {cfg['split']['valid_cases']}  [{cpu_summary()}]", flush=True)
    min_epoch = cfg['recipe'].get('min_epoch', 0)
    kept = {(rule, m): _kept_epoch(hist, rule, m) for rule in MONITORS for m in sorted({0, min_epoch})}
    rows = []
    for f in sorted(work.glob('epoch*.pth'), key=lambda q: int(q.stem[5:])):
        ep = int(f.stem[5:])
        if a.only_kept and ep not in kept.values(): continue
        d = work/f'm{ep}'; d.mkdir()
        shutil.copy(model/'config.json', d/'config.json')
        if (model/'coarse').is_dir(): (d/'coarse').symlink_to(model/'coarse')
        net = build_model(cfg); net.load_state_dict(torch.load(f, weights_only=True)); net.eval()
        write_model_files(net, cfg, d)
        _, scores, _ = score_model(d, work, a, tag=f'_e{ep}')
        v = hist.iloc[ep]
        rows.append({'epoch': ep, 'valid liver': v.liver_dice, 'valid tumour': v.tumor_dice, **scores})
        print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format='{:.4f}'.format), flush=True)
    df = pd.DataFrame(rows).set_index('epoch')
    print('\n' + df.to_string(float_format='{:.4f}'.format))
    for (rule, m), ep in kept.items():
        held = df.loc[ep] if ep in df.index else None
        print(f"rule {rule:10s} from epoch {m} keeps epoch {ep:2d}: " + ('(not scored: before --keep-from)' if held is None else
              '  '.join(f"{k} {v:.4f}" for k, v in held.items() if not k.startswith('valid'))))
    print(f"[{cpu_summary()}]")


if __name__ == '__main__':
    main()
