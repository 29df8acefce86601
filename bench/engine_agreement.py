"""How far each inference engine's labels are from torch's, with a trained model on real held-out CT, and how fast each is.

    python bench/engine_agreement.py --model MODEL --work W --ircadb ../shared/data/ircadb-hu --ircadb-holdout 3Dircadb1.1

MODEL is a trained model folder (the default recipe: coarse to fine, both stages run by the engine named). Every
engine predicts the held-out slices (`--holdout`, default patients 6 and 7 of ../shared/data/ct-slices) and, with
`--ircadb`, the held-out IRCADb series from its DICOM files, with `liver-seg predict --engine E`; `liver-seg evaluate`
scores each case. Printed per engine: Dice per case, the largest |Dice - torch's| over cases and classes, the share of
slice pixels whose label differs from torch's, and the predict time of the slices. "torch" is the model in its own
precision (bf16 autocast for a bf16 model on a CPU with native bf16); "torch-fp32" is the same weights with
`precision` fp32 (a copy of the folder), the yardstick for how much bf16 alone moves the labels. "openvino-int8" runs
the model's int8 graphs, which `liver-seg train --quantize` writes at its end and `liver-seg quantize MODEL
TRAIN_DATA...` writes afterwards (calibrate on the training folders, never on the held-out cases). Work files stay outside the
repository. Measured, never asserted.
"""
import argparse, json, shutil, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary
from accuracy_real import parser as accuracy_parser, prepare_work, score_model

ENGINES = ('torch', 'torch-fp32', 'openvino', 'openvino-bf16', 'openvino-int8', 'onnxruntime')


def fp32_copy(model, work):
    "A copy of `model` (and its coarse stage) whose config says fp32: torch without autocast"
    dst = work/'model_fp32'
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns('.engine'))
    for cfg in dst.rglob('config.json'):
        c = json.loads(cfg.read_text()); c['precision'] = 'fp32'; cfg.write_text(json.dumps(c, indent=2))
    return dst


def slice_labels(folder):
    "Every predicted mask PNG of a folder, in name order, as one array"
    from PIL import Image
    return np.stack([np.asarray(Image.open(f)) for f in sorted(Path(folder).rglob('*.png'))])


def main():
    p = accuracy_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument('--engines', default=','.join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    a = p.parse_args()
    if not a.model: sys.exit('--model is required: a trained model folder')
    work, _ = prepare_work(a)
    model, base = Path(a.model), a.predict_args
    scores, times = {}, {}
    for e in a.engines.split(','):
        m = fp32_copy(model, work) if e == 'torch-fp32' else model
        a.predict_args = f"{base} --engine {'torch' if e == 'torch-fp32' else e}"
        _, scores[e], times[e] = score_model(m, work, a, tag=f'_{e}')
    ref = 'torch' if 'torch' in scores else next(iter(scores))  # what the others are compared with
    lab_ref = slice_labels(work/f'pred_{ref}')
    print(f"\nDice per case and engine; model {model}  [{cpu_summary()}]")
    keys = list(scores[ref])
    print(f"{'engine':14s} " + ' '.join(f'{k:>13s}' for k in keys) + f" {'max |d Dice|':>13s} {'pixels != ' + ref:>16s} {'slices predict s':>17s}")
    for e, s in scores.items():
        dd = max(abs(s[k] - scores[ref][k]) for k in keys)
        differ = (slice_labels(work/f'pred_{e}') != lab_ref).mean()
        print(f"{e:14s} " + ' '.join(f'{s[k]:13.4f}' for k in keys) + f" {dd:13.4f} {differ:16.4%} {times[e]:17.1f}")


if __name__ == '__main__': main()
