"""One training epoch of the default recipe against the seed's `unet_learner(resnet34)` + `fit_one_cycle(1)`, on the
same real slices, each in a fresh child process.

    python bench/train_epoch.py [--cases 0,1,2,3] [--valid 3] [--work /tmp/liver_seg_epoch]

- **seed**: the seed notebook's DataBlock (`ImageBlock`, `MaskBlock(codes)`, `Resize(128)`, `IntToFloatTensor`,
  `Normalize`, batch size 16), `unet_learner(dls, resnet34, loss_func=CrossEntropyLossFlat(axis=1),
  metrics=foreground_acc, pretrained=False)` and `fit_one_cycle(1)`, fp32 as fastai runs it. Its masks are the slices'
  masks written as 0/1/2 PNGs beforehand, outside the timing (the seed exported its own that way).
- **ours**: `liver_seg.train.train` with the default recipe (coarse to fine) for one epoch of each stage
  (`epochs=1, coarse_epochs=1`), `pretrained=False`, the precision it picks on this CPU (`'auto'`).

Both validate on the same case (`--valid`) and train on the others. "fit" is the time inside the child from the
start of training to its end (for ours: both stages, their checkpoints and the model folder); "process" is the whole
child, imports included. The ratio the issue asks for is seed over ours. Run it with `ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2` in the environment to stand in for a CPU without bf16 (the children inherit it). The CPU
and its flags are printed beside the ratios. Measured, never asserted; everything is written under `--work`.
"""
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
from cpuflags import cpu_summary  # noqa: E402
from accuracy_real import link_cases, case_of, REAL  # noqa: E402


def seed_masks(src, dst, cases):
    "The slices of `cases` as the seed's folders: train_images/ (symlinks) and train_masks/<stem>_mask.png with 0/1/2"
    from PIL import Image
    from liver_seg.io import read_mask
    (dst/'train_images').mkdir(parents=True, exist_ok=True); (dst/'train_masks').mkdir(exist_ok=True)
    for f in sorted((src/'images').iterdir()):
        if case_of(f.stem) not in cases: continue
        (dst/'train_images'/f.name).symlink_to(f.resolve())
        mask = read_mask(src/'masks'/f.name, '127')  # images/ and masks/ share names (ct-slices' README)
        Image.fromarray(mask).save(dst/'train_masks'/f'{f.stem}_mask.png')


def seed_epoch(folder, valid):
    "The seed's DataBlock and learner, `fit_one_cycle(1)`; returns the seconds of the fit"
    from fastai.vision.all import (DataBlock, ImageBlock, MaskBlock, Resize, IntToFloatTensor, Normalize, FuncSplitter,
                                   get_image_files, unet_learner, resnet34, CrossEntropyLossFlat, foreground_acc)
    import numpy as np
    folder = Path(folder)
    codes = np.array(['background', 'liver', 'tumor'])
    db = DataBlock(blocks=(ImageBlock(), MaskBlock(codes)), batch_tfms=[IntToFloatTensor(), Normalize()],
                   splitter=FuncSplitter(lambda p: case_of(Path(p).stem) == valid), item_tfms=[Resize(128)],
                   get_items=get_image_files, get_y=lambda x: folder/'train_masks'/f'{x.stem}_mask.png')
    dls = db.dataloaders(folder/'train_images', bs=16)
    learn = unet_learner(dls, resnet34, loss_func=CrossEntropyLossFlat(axis=1), metrics=[foreground_acc], pretrained=False)
    t0 = time.perf_counter()
    learn.fit_one_cycle(1)
    return time.perf_counter() - t0


def ours_epoch(folder, out, valid):
    "`liver_seg.train.train`, default recipe, one epoch of each stage; returns the seconds of the call"
    from liver_seg.train import train
    t0 = time.perf_counter()
    train(folder, out, epochs=1, coarse_epochs=1, pretrained=False, valid_cases=[valid], force=True)
    return time.perf_counter() - t0


def child(fn, *args):
    "Run `fn(*args)` of this module in a fresh Python; returns (process wall s, fit s)"
    code = (f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); sys.path.insert(0, {str(ROOT)!r});"
            f"import train_epoch as b; print('RESULT', json.dumps(b.{fn}(*sys.argv[1:])))")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode: sys.exit(f"{fn} failed:\n{r.stderr[-3000:]}")
    print(r.stdout.strip()[-1500:], flush=True)
    fit = json.loads(r.stdout.strip().splitlines()[-1].split('RESULT', 1)[1])
    return wall, fit


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', default=str(REAL), help='slice folder with images/ and masks/ (default: ../shared/data/ct-slices)')
    ap.add_argument('--cases', default='0,1,2,3', help='comma-separated cases: the training cases and the validation one')
    ap.add_argument('--valid', default='3', help='the validation case (one of --cases)')
    ap.add_argument('--work', default='/tmp/liver_seg_epoch', help='working folder outside the repository (replaced)')
    a = ap.parse_args()
    cases, src, work = set(a.cases.split(',')), Path(a.data), Path(a.work)
    if a.valid not in cases: sys.exit(f"--valid {a.valid} is not one of --cases {a.cases}")
    if not (src/'images').is_dir(): sys.exit(f"{src}: no images/ folder (the shared data is not here)")
    shutil.rmtree(work, ignore_errors=True)
    n = link_cases(src, work/'ours', cases)
    seed_masks(src, work/'seed', cases)
    print(f"CPU: {cpu_summary()}\n{n} slices of cases {a.cases} (validation: case {a.valid}), load average {os.getloadavg()[0]:.1f}", flush=True)
    seed_wall, seed_fit = child('seed_epoch', work/'seed', a.valid)
    ours_wall, ours_fit = child('ours_epoch', work/'ours', work/'model', a.valid)
    print(f"\n| run | fit s | process s |\n|---|---|---|\n| seed: fit_one_cycle(1), fp32 | {seed_fit:.0f} | {seed_wall:.0f} |\n"
          f"| ours: default recipe, one epoch per stage | {ours_fit:.0f} | {ours_wall:.0f} |")
    print(f"\none epoch, seed / ours: {seed_fit / ours_fit:.2f}x fit, {seed_wall / ours_wall:.2f}x whole process  "
          f"[{cpu_summary()}; load average {os.getloadavg()[0]:.1f}]")


if __name__ == '__main__': main()
