"""How much of a CT volume each coarse-to-fine stage sees, and the network FLOPs per volume before and after.

    python bench/cascade_work.py [--fine-size 128] [--coarse-size 64]

For each real volume (the two 3D-IRCADb series in HU, and the 8 patients of ct-slices stacked in slice order) it takes
the true liver's box the way prediction cuts it (`liver_seg.crops.liver_box` with config.json's default margin 0.06 and
2 extra slices, square): the share of slices in the slab and the share of a slice's area inside the box. With those it
counts forward FLOPs per volume (`torch.utils.flop_counter`, ResNet-34 U-Net): the one-stage default (every slice at 128
px) against coarse to fine (every slice at the coarse size, then the slab's slices at the fine size). Measured, never
asserted; the data stays in ../shared (nothing is written).
"""
import argparse, sys
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary  # noqa: E402
DATA = ROOT.parent/'shared'/'data'


def forward_gflops(size):
    from torch.utils.flop_counter import FlopCounterMode
    from liver_seg.model import build_model, default_config
    net = build_model(default_config(arch='resnet34', size=size)).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): net(torch.randn(1, 3, size, size))
    return fc.get_total_flops() / 1e9


def stacks():
    "(name, bool N x H x W liver-or-tumour stack in display orientation) of every real volume found"
    from liver_seg.dicom import read_ircadb_case
    from liver_seg.io import to_canonical, CTVolume
    from liver_seg.windows import display_stack
    from PIL import Image
    for case in sorted((DATA/'ircadb-hu').glob('3Dircadb1.*')):
        vol, lab = read_ircadb_case(case)
        yield case.name, display_stack(to_canonical(CTVolume(lab, vol.affine)).array) > 0
    masks = DATA/'ct-slices'/'masks'
    if masks.is_dir():
        by_case = {}
        for f in masks.glob('*.png'): by_case.setdefault(f.stem.rsplit('_', 1)[0], []).append(f)
        for c in sorted(by_case, key=int):
            files = sorted(by_case[c], key=lambda f: int(f.stem.rsplit('_', 1)[1]))
            yield f'ct-slices {c}', np.stack([np.asarray(Image.open(f)) > 0 for f in files])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--fine-size', type=int, default=128)
    ap.add_argument('--coarse-size', type=int, default=64)
    ap.add_argument('--margin', type=float, default=0.06)
    a = ap.parse_args()
    from liver_seg.crops import liver_box
    one, coarse, fine = forward_gflops(128), forward_gflops(a.coarse_size), forward_gflops(a.fine_size)
    print(f"[{cpu_summary()}]")
    print(f"GFLOP per slice, forward: one stage at 128 px {one:.2f}, coarse at {a.coarse_size} px {coarse:.2f}, fine at {a.fine_size} px {fine:.2f}")
    print("| volume | slices | slab slices (share) | box side / slice side | box area share | one stage GFLOP | coarse to fine GFLOP | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for name, fg in stacks():
        n, h, w = fg.shape
        z0, z1, r0, r1, c0, c1 = liver_box(fg, a.margin, 2)
        before, after = one * n, coarse * n + fine * (z1 - z0)
        ratios.append(before / after)
        print(f"| {name} | {n} | {z1 - z0} ({(z1 - z0) / n:.0%}) | {(r1 - r0) / h:.2f} | {(r1 - r0) * (c1 - c0) / (h * w):.0%} | "
              f"{before:.0f} | {after:.0f} | {before / after:.2f}x |")
    print(f"FLOPs ratio one stage / coarse to fine: {min(ratios):.2f}-{max(ratios):.2f}x (median {np.median(ratios):.2f}x)")


if __name__ == '__main__': main()
