"Safe model loading: the default path never unpickles; a crafted pickle in a model folder is not executed"
import os, pickle, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from liver_seg.io import LiverSegError, read_labels
from liver_seg.model import build_model, default_config, save_model_folder, load_model_folder
from liver_seg.synth import write_lits_case

CLI = [sys.executable, '-c', 'import sys; from liver_seg.cli import main; sys.exit(main())']

class Trap:
    "Unpickling this object writes a marker file: proof that the pickle ran code"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (Path(self.marker).write_text, ('pwned',))

@pytest.fixture
def trapped(tmp_path):
    "A valid hu_windows model folder whose learner.pkl (and a weights.pth) would run code when unpickled"
    cfg = default_config(arch='simple_cnn', size=32, arch_kwargs={'width': 4},
                         input={'kind': 'hu_windows', 'windows': [[150, 30], [200, 60]], 'freqhist': True, 'context': 0})
    folder = save_model_folder(build_model(cfg), cfg, tmp_path/'model')
    marker = tmp_path/'marker.txt'
    (folder/'learner.pkl').write_bytes(pickle.dumps(Trap(marker)))
    return folder, marker

def test_load_model_folder_ignores_the_pickle(trapped):
    folder, marker = trapped
    model, cfg = load_model_folder(folder)
    assert cfg['arch'] == 'simple_cnn' and not marker.exists()

def test_weights_pth_pickle_is_refused_not_run(trapped, tmp_path):
    "With only a crafted weights.pth, torch.load(weights_only=True) refuses it: an error, and no code runs"
    folder, marker = trapped
    (folder/'weights.safetensors').unlink()
    import torch
    with open(folder/'weights.pth', 'wb') as f: pickle.dump(Trap(marker), f)
    with pytest.raises(LiverSegError): load_model_folder(folder)
    assert not marker.exists()

def test_predict_command_does_not_run_the_pickle(trapped, tmp_path):
    folder, marker = trapped
    vol, _ = write_lits_case(tmp_path/'ct', case_id=1, shape=(48, 48, 6), spacing=(2., 2., 5.), seed=2)
    r = subprocess.run(CLI + ['predict', str(folder), str(vol), str(tmp_path/'pred.nii.gz')], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert read_labels(tmp_path/'pred.nii.gz').shape == (48, 48, 6)

def test_allow_pickle_is_opt_in_and_warns(trapped):
    "Asked for explicitly (and only without weights), the pickle is loaded, with a warning that it runs code"
    folder, marker = trapped
    (folder/'weights.safetensors').unlink()
    with pytest.warns(UserWarning, match='runs code'):
        with pytest.raises(Exception): load_model_folder(folder, allow_pickle=True)  # the trap is no learner
    assert marker.read_text() == 'pwned'
