"Data-parallel training: `torchrun` starts two processes (gloo on the CPU) that train one model folder together."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from liver_seg.data import seg_dataloaders, toy_slice_folder
from liver_seg.metrics import ClassOverlap, score
from liver_seg.model import load_model_folder

ROOT = Path(__file__).resolve().parents[1]
FILES = ['config.json', 'history.csv', 'learner.pkl', 'learning_curves.png', 'weights.safetensors']


def test_torchrun_two_processes_write_one_model_folder(tmp_path):
    pytest.importorskip('accelerate', reason="fastai's distributed training needs accelerate (pip install 'liver_seg[distributed]')")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip('this PyTorch has no gloo backend')
    data = toy_slice_folder(tmp_path/'data'/'toy', n_cases=4, n_slices=8, size=48)
    for f in (data/'masks').glob('3_*.png'): # no liver in case 3: each process's half of the validation set scores
        Image.fromarray(np.zeros_like(np.array(Image.open(f)))).save(f) # very differently from the whole set
    models = tmp_path/'models'; models.mkdir()
    # `python -m torch.distributed.run` is `torchrun` for the interpreter running the tests
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
           '-m', 'liver_seg', 'train', str(data), '--out', 'm', '--arch', 'resnet18', '--size', '32', '--epochs', '1',
           '--bs', '2', '--no-pretrained', '--valid-cases', '2,3', '--precision', 'fp32', '--no-cascade']  # one stage: whole slices to validate
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    r = subprocess.run(cmd, cwd=models, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = models/'m'
    # rank 0 alone wrote the folder (relative --out, as from a shell), and no temporary folder of any rank is left
    assert [p.name for p in models.iterdir()] == ['m']
    assert sorted(p.name for p in m.iterdir()) == FILES
    net, cfg = load_model_folder(m)
    assert cfg['recipe']['processes'] == 2 and cfg['recipe']['n_train'] == 16 and cfg['recipe']['n_valid'] == 16
    assert cfg['split'] == {'train_cases': ['0', '1'], 'valid_cases': ['2', '3']}
    h = pd.read_csv(m/'history.csv')
    assert list(h.epoch) == [0] and h.train_loss.notna().all()
    # each process validated half of the 16 validation slices (in order: case 2 on rank 0, case 3 on rank 1); the
    # Dice in history.csv is that of all 16 (counts summed over the processes), which the reloaded weights reproduce
    dls = seg_dataloaders(data, size=32, bs=8, valid_cases=['2', '3'], normalize=cfg['normalize'], augment=False,
                          context=cfg['input']['context'])
    with torch.no_grad(): batches = [(net(x), y) for x, y in dls.valid]
    assert len(batches) == 2
    whole, halves = score(ClassOverlap(1, 'dice'), batches), [score(ClassOverlap(1, 'dice'), [b]) for b in batches]
    assert whole == pytest.approx(h.liver_dice.iloc[0], abs=1e-3)
    assert all(abs(d - whole) > 0.02 for d in halves), (whole, halves) # else this check could not tell them apart
