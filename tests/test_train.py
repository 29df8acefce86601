"Training end to end: short runs write a model folder that reloads to the same predictions; the split is by case."
import json, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from liver_seg.data import CaseSplitter, seg_dataloaders, toy_slice_folder
from liver_seg.io import LiverSegError
from liver_seg.model import load_model_folder
from liver_seg.train import train, load_train_config
from fastai.layers import ResBlock
from fastai.vision.models.unet import UnetBlock

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent/'shared'/'data'/'ct-slices'


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return toy_slice_folder(tmp_path_factory.mktemp('data')/'toy', n_cases=4, n_slices=8, size=48)


@pytest.fixture(scope='module')
def trained(toy, tmp_path_factory):
    "A resnet34 U-Net trained from scratch for 3 short epochs at 32 px on the toy slices (lr 3e-3 diverges here: the loss rose)"
    out = tmp_path_factory.mktemp('models')/'m'
    return train(toy, out, arch='resnet34', size=32, epochs=3, bs=8, lr=1e-3, valid_cases=['3'],
                 pretrained=False, progress=False, loss='ce', tumor_weight=0, context=0, # one slice per input: learn.predict(path) below
                 cascade=False, # one stage: this file checks one model's folder, learner and checkpoints (coarse to fine: test_cli)
                 bottle=False) # fastai's full last block: at 32 px on the toy slices the halved one (the default) did not lower the loss in 3 epochs


def test_short_run_lowers_loss_and_writes_folder(trained):
    names = sorted(p.name for p in trained.iterdir())
    assert names == ['config.json', 'history.csv', 'learner.pkl', 'learning_curves.png', 'weights.safetensors']
    h = pd.read_csv(trained/'history.csv')
    assert list(h.epoch) == [0, 1, 2]
    assert h.train_loss.iloc[-1] < h.train_loss.iloc[0]
    assert h.valid_loss.iloc[-1] < h.valid_loss.iloc[0]
    cfg = json.loads((trained/'config.json').read_text())
    assert cfg['split'] == {'train_cases': ['0', '1', '2'], 'valid_cases': ['3']}
    assert (cfg['arch'], cfg['size'], cfg['n_in'], cfg['n_out']) == ('resnet34', 32, 3, 3)
    assert cfg['codes'] == ['background', 'liver', 'tumor'] and cfg['resize'] == 'squish'
    assert cfg['input']['kind'] == 'image' and cfg['input']['context'] == 0
    assert len(cfg['normalize']['mean']) == 3 and all(s > 0 for s in cfg['normalize']['std'])
    assert cfg['precision'] in ('bf16', 'fp32') and cfg['recipe']['pretrained'] is False


def test_weights_reload_to_same_predictions_as_learner(trained, toy):
    "weights.safetensors (no pickle) and the fastai export give the same logits for the same batch"
    model, cfg = load_model_folder(trained)
    dls = seg_dataloaders(toy, size=32, bs=8, valid_cases=['3'], normalize=cfg['normalize'], augment=False)
    xb, _ = dls.valid.one_batch()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from liver_seg.model import load_learner_pkl
        learn = load_learner_pkl(trained)
    learn.model.eval()
    with torch.no_grad():
        a, b = model(xb), learn.model(xb)
    torch.testing.assert_close(a, b)
    assert a.shape == (8, 3, 32, 32)


def test_learner_pkl_loads_in_fresh_process(trained, toy):
    img = sorted((toy/'images').iterdir())[0]
    code = ("import warnings; warnings.simplefilter('ignore');"
            "from liver_seg.model import load_learner_pkl;"
            f"learn = load_learner_pkl({str(trained)!r});"
            f"dec, _, probs = learn.predict({str(img)!r});"
            "print(tuple(dec.shape), set(dec.unique().tolist()) <= {0, 1, 2}, tuple(probs.shape))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == '(32, 32) True (3, 32, 32)'


def test_existing_output_is_kept(trained, toy):
    before = (trained/'weights.safetensors').read_bytes()
    with pytest.raises(LiverSegError, match='exists'):
        train(toy, trained, arch='simple_cnn', pretrained=False, epochs=1, progress=False)
    assert (trained/'weights.safetensors').read_bytes() == before


def test_seeded_runs_are_reproducible(toy, tmp_path):
    kw = dict(arch='simple_cnn', size=32, epochs=1, bs=8, valid_cases=['3'], pretrained=False, progress=False, seed=3)
    h1 = pd.read_csv(train(toy, tmp_path/'a', **kw)/'history.csv').drop(columns='time')
    h2 = pd.read_csv(train(toy, tmp_path/'b', **kw)/'history.csv').drop(columns='time')
    pd.testing.assert_frame_equal(h1, h2)


@settings(max_examples=60, deadline=None)
@given(n_cases=st.integers(2, 12), pct=st.floats(0.0, 1.0), seed=st.integers(0, 10**6),
       per_case=st.lists(st.integers(1, 5), min_size=12, max_size=12))
def test_splitter_never_puts_a_case_on_both_sides(n_cases, pct, seed, per_case):
    cases = [str(c) for c in range(n_cases) for _ in range(per_case[c])]
    items = pd.DataFrame({'case': cases, 'slice': range(len(cases))}).sample(frac=1, random_state=seed)
    tr, va = CaseSplitter(valid_pct=pct, seed=seed)(items)
    tc, vc = set(items.case.iloc[tr]), set(items.case.iloc[va])
    assert tc.isdisjoint(vc) and tc and vc
    assert sorted(tr + va) == list(range(len(items)))


def test_named_valid_cases(toy):
    items = pd.DataFrame({'case': list('aabbcc'), 'slice': range(6)})
    tr, va = CaseSplitter(valid_cases=['b'])(items)
    assert list(items.case.iloc[va]) == ['b', 'b'] and len(tr) == 4
    with pytest.raises(LiverSegError, match='no such case'):
        CaseSplitter(valid_cases=['z'])(items)
    with pytest.raises(LiverSegError, match='nothing to train on'):
        CaseSplitter(valid_cases=['a', 'b', 'c'])(items)


def test_config_file_equals_flags(tmp_path):
    f = tmp_path/'r.json'
    f.write_text(json.dumps({'arch': 'resnet18', 'valid-cases': '6,7', 'no-pretrained': True, 'loss': 'ce+dice'}))
    assert load_train_config(f) == {'arch': 'resnet18', 'valid_cases': ['6', '7'], 'pretrained': False, 'loss': 'ce+dice'}


def test_real_slices_train_a_few_batches(tmp_path):
    if not REAL.exists(): pytest.skip(f"{REAL} not present")
    out = train(REAL, tmp_path/'real', arch='resnet34', size=32, epochs=1, bs=16, valid_cases=['6', '7'],
                pretrained=False, every=24, progress=False)
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['split']['valid_cases'] == ['6', '7'] and '6' not in cfg['split']['train_cases']
    h = pd.read_csv(out/'history.csv')
    assert len(h) == 1 and np.isfinite(h.valid_loss).all()
    model, _ = load_model_folder(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def _history_rows(f):
    try: return len(pd.read_csv(f))
    except (OSError, pd.errors.EmptyDataError): return 0


def test_kill_9_leaves_no_model_folder_and_resume_finishes(toy, tmp_path):
    "SIGKILL mid-run (in the fine stage): no model folder, the run folder keeps the finished epochs; --resume keeps the coarse stage and completes the same schedule"
    import signal, time
    out = tmp_path/'model'
    args = [sys.executable, '-m', 'liver_seg', 'train', toy, '--out', out, '--arch', 'simple_cnn', '--size', '32',
            '--epochs', '40', '--bs', '8', '--lr', '0.01', '--valid-cases', '3', '--no-pretrained']
    args = [str(a) for a in args]
    run = tmp_path/'.model.partial'
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 240:
        if (run/'last.pth').exists() and _history_rows(run/'history.csv') >= 3: break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    if proc.returncode == 0: pytest.skip("the run finished before it could be killed")
    assert not out.exists()
    before = pd.read_csv(run/'history.csv')
    done = torch.load(run/'last.pth', weights_only=True)['epochs_done']
    assert 1 <= done < 40 and len(before) >= done   # history may hold one row more than the checkpoint: dropped on resume
    coarse = (tmp_path/'.model.coarse'/'weights.safetensors').read_bytes()   # finished before the fine stage began
    res = subprocess.run(args + ['--resume'], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    h = pd.read_csv(out/'history.csv')
    assert list(h.epoch) == list(range(40))
    cols = ['train_loss', 'valid_loss', 'liver_dice']
    np.testing.assert_allclose(h[cols].iloc[:done].to_numpy(), before[cols].iloc[:done].to_numpy(), rtol=1e-6)
    assert json.loads((out/'config.json').read_text())['recipe']['resumed_at_epoch'] == done
    assert not run.exists() and not any(p.name.startswith('.') for p in tmp_path.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ['coarse', 'config.json', 'history.csv', 'learner.pkl', 'learning_curves.png', 'weights.safetensors']
    assert (out/'coarse'/'weights.safetensors').read_bytes() == coarse  # the finished coarse stage was kept, not retrained


@pytest.fixture(scope='module')
def default_unet(toy, tmp_path_factory):
    "A folder trained with fastai's default U-Net options (resnet18, 32 px, 1 epoch; given, as a CPU without bf16 plans `last_cross=False, half_decoder=True`)"
    return train(toy, tmp_path_factory.mktemp('unet')/'m', arch='resnet18', size=32, epochs=1, bs=8, valid_cases=['3'],
                 pretrained=False, progress=False, cascade=False, last_cross=True, bottle=False, half_decoder=False)


@pytest.mark.parametrize('option', [{'last_cross': False}, {'bottle': True}, {'half_decoder': True}])
def test_lighter_unet_option_is_saved_and_reloads(toy, tmp_path, default_unet, option):
    "last_cross=False / bottle=True / half_decoder=True build a lighter U-Net, say so in config.json, and the folder reloads to that network"
    m = train(toy, tmp_path/'m', arch='resnet18', size=32, epochs=1, bs=8, valid_cases=['3'], pretrained=False,
              progress=False, cascade=False, **{'last_cross': True, 'bottle': False, 'half_decoder': False, **option})  # one option changed, whatever the plan
    cfg = json.loads((m/'config.json').read_text())
    (k, v), = option.items()
    assert cfg['arch_kwargs'] == option and cfg['recipe'][k] is v
    assert json.loads((default_unet/'config.json').read_text()).get('arch_kwargs') is None # fastai's defaults are not written
    net, full = load_model_folder(m)[0], load_model_folder(default_unet)[0] # strict loading: weights fit the rebuilt network
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full.parameters())
    block = net.layers[-3] # the full-resolution ResBlock: halved by bottle, gone without last_cross
    halved = isinstance(block, ResBlock) and block.convpath[0][0].out_channels == block.convpath[0][0].in_channels // 2
    assert halved == (k == 'bottle')
    blocks = [b for b in net.layers if isinstance(b, UnetBlock)]  # fastai halves the channels of the last block only
    assert all(b.conv2[0].out_channels == b.conv1[0].in_channels // 2 for b in blocks) == (k == 'half_decoder')


def test_crop_trains_on_patches_and_predicts_whole_slices(toy, tmp_path):
    "crop=16 at size=32: training batches are 16 px patches, validation and prediction use whole 32 px slices"
    from fastai.callback.core import Callback
    seen = {}
    class Shapes(Callback):
        def before_batch(self): seen.setdefault('train' if self.training else 'valid', tuple(self.xb[0].shape[-2:]))
    m = train(toy, tmp_path/'m', arch='resnet18', size=32, crop=16, epochs=1, bs=8, valid_cases=['3'], pretrained=False,
              progress=False, cbs=[Shapes()], cascade=False)  # random patches of whole slices: one stage
    assert seen == {'train': (16, 16), 'valid': (32, 32)}
    cfg = json.loads((m/'config.json').read_text())
    assert cfg['size'] == 32 and cfg['recipe']['crop'] == 16
    from liver_seg.predict import predict_slices
    out = predict_slices(m, toy/'images', tmp_path/'pred', progress=False)
    assert len(list(Path(out).glob('*.png'))) == len(list((toy/'images').iterdir()))
