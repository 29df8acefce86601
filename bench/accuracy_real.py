"""Accuracy on real CT, case-held-out: train with `liver-seg train` on some cases of ../shared/data/ct-slices, predict
the held-out cases with `liver-seg predict`, score them with `liver-seg evaluate`.

    python bench/accuracy_real.py [--holdout 6,7] [--work /tmp/liver_seg_accuracy]
                                  [--train-args "--size 160 --epochs 10 --loss ce+dice"] [--predict-args=--tta]
                                  [--ircadb ../shared/data/ircadb-hu --ircadb-holdout 3Dircadb1.7]

With `--ircadb`, the 3D-IRCADb cases other than `--ircadb-holdout` are exported with `liver-seg prepare --windows lits`
(8-bit gray through the LiTS slices' window) and trained on beside the slices, and the held-out patient's DICOM series
(`PATIENT_DICOM/`, in HU) is predicted from its files and scored against its masks (liver, union of livertumor*).

The held-out cases are never seen in training: a temporary slice folder of symlinks to the training cases only
(images/ + masks/) is what `liver-seg train` gets, so its own validation split (a seeded case, or `--valid-cases`
passed in `--train-args`) is one of the training cases. Everything (symlinks, model folder, predicted masks, CSV) is
written under `--work`, outside the repository: the data and anything derived from it (models, predictions) must never
be copied into the project. Always `--no-pretrained` (no downloads). Prints liver and tumour Dice per held-out case,
their means, the training time (from the model's config.json), the wall time, and the load average before and after.
Measured, never asserted. Results: bench/RESULTS.md.
"""
import argparse, json, os, shlex, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary  # noqa: E402
REAL = ROOT.parent/'shared'/'data'/'ct-slices'
IRCADB = ROOT.parent/'shared'/'data'/'ircadb-hu'


def case_of(stem): return stem.rsplit('_', 1)[0]


def link_cases(src, dst, cases, subdirs=('images', 'masks')):
    "Folder `dst` with `subdirs` holding symlinks to the slices of `cases` in `src`; returns the number of slices"
    n = 0
    for sub in subdirs:
        (dst/sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src/sub).iterdir()):
            if case_of(f.stem) in cases:
                (dst/sub/f.name).symlink_to(f.resolve()); n += sub == subdirs[0]
    return n


def run(cmd, log):
    print('$', ' '.join(shlex.quote(str(c)) for c in cmd), flush=True)
    t0 = time.time()
    with open(log, 'w') as fh: r = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT)
    dt = time.time() - t0
    if r.returncode:
        print(Path(log).read_text()[-3000:]); sys.exit(f"failed ({r.returncode}): see {log}")
    return dt


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=str(REAL), help='slice folder with images/ and masks/ (default: ../shared/data/ct-slices)')
    p.add_argument('--holdout', default='6,7', help='comma-separated cases never seen in training (default 6,7)')
    p.add_argument('--train-cases', default=None, help='comma-separated training cases (default: all the others)')
    p.add_argument('--work', default='/tmp/liver_seg_accuracy', help='working folder outside the repository (replaced)')
    p.add_argument('--train-args', default='', help='extra `liver-seg train` flags, e.g. "--size 160 --epochs 10" (--train-args=--flag for a single flag)')
    p.add_argument('--predict-args', default='', help='extra `liver-seg predict` flags; write --predict-args=--no-postprocess (with =) for one flag')
    p.add_argument('--model', default=None, help='skip training: evaluate this existing model folder')
    p.add_argument('--ircadb', default=None, help=f'3D-IRCADb cases in HU to train on and hold out (e.g. {IRCADB})')
    p.add_argument('--ircadb-holdout', default='3Dircadb1.7', help='the IRCADb case predicted from its DICOM files, never trained on')
    return p


def prepare_work(a):
    "Fill `a.work` with the training and held-out slice folders (symlinks) and the exported IRCADb training cases; return (work, training folders)"
    data, work = Path(a.data), Path(a.work).resolve()
    if not (data/'images').is_dir(): sys.exit(f"{data}: no images/ folder (the real slices are not present)")
    if work == ROOT or ROOT in work.parents: sys.exit(f"{work}: inside the repository; use a folder outside it")
    cases = sorted({case_of(f.stem) for f in (data/'images').iterdir()}, key=lambda c: (len(c), c))
    hold = [c.strip() for c in a.holdout.split(',') if c.strip()]
    train_cases = [c.strip() for c in a.train_cases.split(',')] if a.train_cases else [c for c in cases if c not in hold]
    if set(hold) & set(train_cases): sys.exit("a held-out case is also a training case")
    if work.exists(): shutil.rmtree(work)
    work.mkdir(parents=True)
    n_train = link_cases(data, work/'train', set(train_cases))
    n_hold = link_cases(data, work/'holdout', set(hold))
    print(f"train cases {','.join(train_cases)} ({n_train} slices); held out {','.join(hold)} ({n_hold} slices); work {work}")
    folders = [work/'train']
    if a.ircadb and not getattr(a, 'model', None):  # an existing model is only scored: nothing to train on
        ircadb = Path(a.ircadb).resolve()
        for c in sorted(p.name for p in ircadb.iterdir() if (p/'PATIENT_DICOM').is_dir() and p.name != a.ircadb_holdout):
            run(['liver-seg', 'prepare', ircadb/c, work/'ircadb', '--windows', 'lits', '--format', 'png'], work/f'prepare-{c}.log')
            folders = [work/'train', work/'ircadb']
        print(f"IRCADb: trained on the cases of {work/'ircadb'}, held out {a.ircadb_holdout}")
    return work, folders


def score_model(model, work, a, tag=''):
    "Predict and score the held-out slices (and the held-out IRCADb series with `--ircadb`); return the Dice per case"
    t_pred = run(['liver-seg', 'predict', model, work/'holdout'/'images', work/f'pred{tag}', *shlex.split(a.predict_args)],
                 work/f'predict{tag}.log')
    run(['liver-seg', 'evaluate', work/f'pred{tag}', work/'holdout'/'masks', '--csv', work/f'eval{tag}.csv'], work/f'evaluate{tag}.log')
    import pandas as pd
    df = pd.read_csv(work/f'eval{tag}.csv')
    df['case'] = df['case'].astype(str)
    scores = {f'liver {c}': l for c, l in zip(df.case, df.liver_dice)} | {f'tumour {c}': t for c, t in zip(df.case, df.tumor_dice)}
    if a.ircadb: scores |= score_dicom(model, Path(a.ircadb).resolve()/a.ircadb_holdout, work, a.predict_args, tag)
    return df, scores, t_pred


def main():
    a = parser().parse_args()
    t_start = time.time(); load0 = os.getloadavg()
    work, folders = prepare_work(a)
    model = Path(a.model) if a.model else work/'model'
    t_train_wall = 0.
    if not a.model:
        t_train_wall = run(['liver-seg', 'train', *folders, '--out', model, '--no-pretrained', *shlex.split(a.train_args)],
                           work/'train.log')
    cfg = json.loads((model/'config.json').read_text())
    df, _, t_pred = score_model(model, work, a)
    rec = cfg.get('recipe', {})
    print(f"\nrecipe: size {cfg['size']}, epochs {rec.get('epochs')}, loss {rec.get('loss')}, context {rec.get('context')}, "
          f"tumor_weight {rec.get('tumor_weight')}, every {rec.get('every')}, lr {rec.get('lr')}, bs {rec.get('bs')}, "
          f"precision {rec.get('precision')}, best epoch {rec.get('best_epoch')}; split {cfg.get('split')}")
    print(df[['case', 'liver_dice', 'tumor_dice']].to_string(index=False, float_format='{:.4f}'.format))
    print(f"mean liver Dice {df.liver_dice.mean():.4f}, mean tumour Dice {df.tumor_dice.mean():.4f}")
    print(f"train time {rec.get('train_seconds', float('nan'))/60:.1f} min (fit; train command wall {t_train_wall/60:.1f} min), "
          f"predict {t_pred:.0f} s, wall {(time.time() - t_start)/60:.1f} min  [{cpu_summary()}]")
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")


def score_dicom(model, case, work, predict_args, tag=''):
    "Predict an IRCADb case's DICOM series (HU) from its files; score it against its masks with `liver-seg evaluate`"
    truth = work/'dicom_truth'
    if not truth.is_dir():  # the truth is written once, for every model scored in this work folder
        from liver_seg.dicom import read_ircadb_case
        from liver_seg.io import write_labels
        vol, labels = read_ircadb_case(case)
        truth.mkdir(); write_labels(labels, vol, truth/f'{case.name}.nii.gz')
    pred = work/f'dicom_pred{tag}'; pred.mkdir()
    t = run(['liver-seg', 'predict', model, case/'PATIENT_DICOM', pred/f'{case.name}.nii.gz', *shlex.split(predict_args)],
            work/f'predict_dicom{tag}.log')
    run(['liver-seg', 'evaluate', pred, truth, '--csv', work/f'eval_dicom{tag}.csv'], work/f'evaluate_dicom{tag}.log')
    import pandas as pd
    d = pd.read_csv(work/f'eval_dicom{tag}.csv')
    print(f"DICOM series in HU, {case.name} (predicted in {t:.0f} s): liver Dice {d.liver_dice.iloc[0]:.4f}, "
          f"tumour Dice {d.tumor_dice.iloc[0]:.4f}")
    return {'DICOM liver': d.liver_dice.iloc[0], 'DICOM tumour': d.tumor_dice.iloc[0]}


if __name__ == '__main__': main()
