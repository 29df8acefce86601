"CPU inference engines (liver_seg.engine): labels as torch's, the graph cache reused and repaired, torch when an engine cannot run"
import os, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch

from liver_seg import engine as E
from liver_seg.core import class_mask
from liver_seg.evaluate import overlap_metrics
from liver_seg.io import to_display
from liver_seg.model import build_model, default_config, save_model_folder
from liver_seg.predictor import Predictor, get_predictor
from liver_seg.synth import make_phantom
from liver_seg.windows import volume_channels

HU_INPUT = {'kind': 'hu_windows', 'windows': [[150, 30], [200, 60]], 'freqhist': True, 'context': 0}
# An engine's labels may differ from torch's in this fraction of pixels at most, and its per-class Dice by less than DICE_TOL
# (the notebook 09b_engine states what was measured: identical labels in fp32 on the phantom)
PIXEL_TOL, DICE_TOL = 1e-4, 1e-3


def installed(name):
    try: __import__(name); return True
    except ImportError: return False

ENGINES = [pytest.param(e, marks=pytest.mark.skipif(not installed(e), reason=f"{e} is not installed (the cpu-engine extra)"))
           for e in ('openvino', 'onnxruntime')]
needs_any = pytest.mark.skipif(not (installed('openvino') or installed('onnxruntime')), reason="neither openvino nor onnxruntime is installed")
first_engine = 'openvino' if installed('openvino') else 'onnxruntime'


def slices(seed, n=16):
    "Channels and labels of `n` middle slices of a 96 x 96 phantom, display orientation"
    hu, lab, _ = make_phantom((96, 96, 40), seed=seed)
    ks = list(range(12, 12 + n))
    return volume_channels(hu, ks=ks, windows=HU_INPUT['windows']), np.stack([to_display(lab[:, :, k]) for k in ks])


def train_tiny(folder, precision='fp32', seed=0, steps=60):
    "A width-8 simple_cnn at 48 px trained briefly on a phantom: labels that mean something, in a second"
    cfg = default_config(arch='simple_cnn', size=48, precision=precision, arch_kwargs={'width': 8}, input=HU_INPUT)
    torch.manual_seed(seed)
    net = build_model(cfg)
    p = Predictor(net, cfg, 'cpu', engine='torch')
    xs, ys = slices(10, n=24)
    x = torch.from_numpy(p.inputs(xs))  # what prediction feeds the network
    y = torch.nn.functional.interpolate(torch.from_numpy(ys)[:, None].float(), size=(48, 48), mode='nearest')[:, 0].long()
    opt, threads = torch.optim.Adam(net.parameters(), 1e-2), torch.get_num_threads()
    net.train(); torch.set_num_threads(1)
    try:
        for _ in range(steps):
            b = torch.randint(0, len(x), (16,))
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b]); opt.zero_grad(); loss.backward(); opt.step()
    finally: torch.set_num_threads(threads)
    return save_model_folder(net.eval(), cfg, folder, force=True)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory): return train_tiny(tmp_path_factory.mktemp('engine')/'model')


@pytest.fixture(scope='module')
def data(): return slices(3)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    "Every test gets its own user cache and a fresh warn-once memory"
    monkeypatch.setenv('LIVER_SEG_CACHE', str(tmp_path/'user-cache'))
    E._WARNED.clear()


def assert_agrees(lab, ref, gt, pixel_tol=PIXEL_TOL):
    "Labels `lab` within the tolerance of torch's `ref`: pixels that differ, and per-class Dice against the truth `gt`"
    assert lab.shape == ref.shape and lab.dtype == ref.dtype
    assert (lab != ref).mean() <= pixel_tol, (lab != ref).mean()
    for c in ('liver', 'tumor'):
        d, d_ref = (overlap_metrics(class_mask(l, c), class_mask(gt, c))['dice'] for l in (lab, ref))
        assert abs(d - d_ref) < DICE_TOL, (c, d, d_ref)


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('tta', [False, True])
def test_labels_as_torch(model_dir, data, engine, tta):
    imgs, gt = data
    ref = Predictor.from_folder(model_dir, 'cpu', engine='torch').labels(imgs, tta)
    assert (class_mask(ref, 'liver') & class_mask(gt, 'liver')).any()  # the tiny model finds liver: labels to compare
    p = Predictor.from_folder(model_dir, 'cpu', engine=engine)
    assert p.engine.name == engine and engine in repr(p)
    assert_agrees(p.labels(imgs, tta), ref, gt)
    lab, prob = p.labels(imgs, tta, probabilities=True)
    _, prob_ref = Predictor.from_folder(model_dir, 'cpu', engine='torch').labels(imgs, tta, probabilities=True)
    np.testing.assert_allclose(prob, prob_ref, atol=1e-3)


@pytest.mark.skipif(not installed('openvino'), reason="openvino is not installed (the cpu-engine extra)")
@pytest.mark.skipif(not E.cpu_has_bf16(), reason="this CPU has no native bf16: a bf16 model runs in fp32")
def test_bf16_model(tmp_path, data):
    "A bf16 model: 'openvino' runs f32 (torch fp32's labels, within the tolerance of torch's bf16); 'openvino-bf16', which 'auto' picks, bf16"
    imgs, gt = data
    d = train_tiny(tmp_path/'bf16', precision='bf16')
    ref = Predictor.from_folder(d, 'cpu', engine='torch')
    p = Predictor.from_folder(d, 'cpu', engine='openvino')
    assert repr(ref.engine) == 'torch bf16 autocast' and repr(p.engine) == 'openvino f32'
    assert_agrees(p.labels(imgs), ref.labels(imgs), gt, pixel_tol=1e-3)  # fp32 against bf16 autocast: boundary pixels differ
    ov16 = Predictor.from_folder(d, 'cpu', engine='openvino-bf16')
    assert repr(ov16.engine) == 'openvino bf16'
    assert (ov16.labels(imgs) != ref.labels(imgs)).mean() < 1e-2  # same network, bf16 rounding at boundary pixels only
    auto = Predictor.from_folder(d, 'cpu')
    assert repr(auto.engine) == 'openvino bf16' and auto.model is None  # 'auto' for a bf16 model on a bf16 CPU
    np.testing.assert_array_equal(auto.labels(imgs), ov16.labels(imgs))


@needs_any
def test_auto(model_dir, data):
    "'auto' uses an engine for a model folder on the CPU, torch for a network in memory"
    p = get_predictor(model_dir, 'cpu')
    assert p.engine.name == first_engine and repr(p.engine) in ('openvino f32', 'onnxruntime fp32')
    pair = Predictor(*E_load(model_dir), 'cpu')
    assert pair.engine.name == 'torch'
    assert get_predictor(E_load(model_dir), 'cpu', engine=first_engine).engine.name == first_engine


def E_load(folder):
    from liver_seg.model import load_model_folder
    return load_model_folder(folder)


@needs_any
def test_cache_reused(model_dir, monkeypatch, data):
    "The second predictor of a folder reads the cached graph: no export, the file untouched, the network never built"
    import liver_seg.model as M
    calls, built = [], []
    real, real_build = E.export_onnx, M.build_model
    monkeypatch.setattr(E, 'export_onnx', lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(M, 'build_model', lambda *a, **k: built.append(1) or real_build(*a, **k))
    for f in (model_dir/E.ENGINE_DIR).glob('*.onnx'): f.unlink()
    p1 = Predictor.from_folder(model_dir, 'cpu', engine=first_engine)
    assert p1.engine.exported and len(calls) == 1 and len(built) == 1
    g = p1.engine.graph
    assert g.parent == model_dir/E.ENGINE_DIR and g.is_file()
    mtime = g.stat().st_mtime_ns
    p2 = Predictor.from_folder(model_dir, 'cpu', engine=first_engine)
    assert not p2.engine.exported and len(calls) == 1 and len(built) == 1
    assert p2.engine.graph == g and g.stat().st_mtime_ns == mtime
    assert not list((model_dir/E.ENGINE_DIR).glob('.*.tmp'))  # no temporary file left behind
    imgs, _ = data
    np.testing.assert_array_equal(p2.labels(imgs), p1.labels(imgs))
    assert Predictor.from_folder(model_dir, 'cpu', engine='torch').model is not None and len(built) == 2  # torch needs the network


@needs_any
def test_cached_graph_predicts_without_torch(tmp_path):
    "`liver-seg predict` with a cached graph never imports torch or fastai (only the first run builds the U-Net), nor matplotlib without --statistics/--preview"
    import subprocess, nibabel as nib
    cfg = default_config(arch='resnet18', size=32, input=HU_INPUT)
    folder = save_model_folder(build_model(cfg).eval(), cfg, tmp_path/'model')
    hu, _, aff = make_phantom((32, 32, 4), seed=0)
    nib.save(nib.Nifti1Image(hu, aff), tmp_path/'ct.nii.gz')
    def run(*extra):
        args = ['predict', str(folder), str(tmp_path/'ct.nii.gz'), str(tmp_path/'out.nii.gz'), '--force', '--engine', first_engine, *extra]
        code = f"import sys; from liver_seg.cli import main; rc = main({args!r}); print(rc, *(m in sys.modules for m in ('fastai.vision.learner', 'torch', 'matplotlib')))"
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()[-4:]
    assert run()[:3] == ['0', 'True', 'True']  # the first run exports the graph: the network is built (and fastai brings matplotlib)
    assert run() == ['0', 'False', 'False', 'False']
    assert run('--statistics') == ['0', 'False', 'False', 'True']
    assert len(list((folder/E.ENGINE_DIR).glob('*.onnx'))) == 1


@needs_any
@pytest.mark.parametrize('part', ['graph', 'weights'])
@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_corrupt_cache_replaced(model_dir, data, damage, part):
    "A damaged graph file, or its `.data` weights file, is exported again quietly"
    imgs, gt = data
    g = Predictor.from_folder(model_dir, 'cpu', engine=first_engine).engine.graph
    f = g if part == 'graph' else Path(str(g) + '.data')
    good = f.read_bytes()
    f.write_bytes({'truncated': good[:len(good) // 3], 'garbage': b'not an onnx graph' * 50, 'empty': b''}[damage])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # repaired quietly, no fallback warning
        p = Predictor.from_folder(model_dir, 'cpu', engine=first_engine)
    assert p.engine.name == first_engine and p.engine.exported and p.engine.graph == g
    assert f.read_bytes() == good
    assert_agrees(p.labels(imgs), Predictor.from_folder(model_dir, 'cpu', engine='torch').labels(imgs), gt)


@pytest.mark.skipif(not installed('onnxruntime'), reason='onnxruntime is not installed')
def test_onnxruntime_repair_is_quiet(model_dir, capfd):
    "A damaged weights file is exported again under ONNX Runtime too, and its own log prints nothing on the way"
    g = Predictor.from_folder(model_dir, 'cpu', engine='onnxruntime').engine.graph
    d = Path(str(g) + '.data'); d.write_bytes(d.read_bytes()[:1000])
    capfd.readouterr()
    p = Predictor.from_folder(model_dir, 'cpu', engine='onnxruntime')
    assert p.engine.name == 'onnxruntime' and p.engine.exported
    assert 'onnxruntime' not in capfd.readouterr().err


@needs_any
def test_stale_graph_replaced(tmp_path, model_dir):
    "New weights in the same folder: a new graph, and the old one goes"
    d = tmp_path/'m'
    import shutil; shutil.copytree(model_dir, d)
    old = Predictor.from_folder(d, 'cpu', engine=first_engine).engine.graph
    old_bytes, old_data = old.read_bytes(), Path(str(old) + '.data').read_bytes()
    from liver_seg.model import load_model_folder
    net, cfg = load_model_folder(d)
    with torch.no_grad(): net[-1].bias += 1
    save_model_folder(net, cfg, d, force=True)
    (d/E.ENGINE_DIR).mkdir(exist_ok=True)  # save_model_folder replaced the folder; put the stale graph back
    (d/E.ENGINE_DIR/old.name).write_bytes(old_bytes); (d/E.ENGINE_DIR/(old.name + '.data')).write_bytes(old_data)
    p = Predictor.from_folder(d, 'cpu', engine=first_engine)
    assert p.engine.exported and p.engine.graph != old
    name = p.engine.graph.name
    assert sorted(f.name for f in (d/E.ENGINE_DIR).glob('*.onnx*')) == [name, name + '.data']


@needs_any
def test_rewritten_weights_are_hashed_again(tmp_path, model_dir, data):
    "Weights rewritten in place (same size, same folder, the old graph and its remembered key still there): the new weights' graph runs"
    import shutil
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    d = tmp_path/'m'; shutil.copytree(model_dir, d)
    old = Predictor.from_folder(d, 'cpu', engine=first_engine).engine.graph
    assert (d/E.ENGINE_DIR/'weights.key').is_file()
    state = load_file(d/'weights.safetensors')
    last_bias = [k for k in state if k.endswith('bias')][-1]
    state[last_bias] = state[last_bias] + 5 * (torch.arange(len(state[last_bias])) == 1)  # the output layer: far more liver
    size = (d/'weights.safetensors').stat().st_size
    with safe_open(d/'weights.safetensors', 'pt') as f: meta = f.metadata()
    save_file(state, d/'weights.safetensors', metadata=meta)
    assert (d/'weights.safetensors').stat().st_size == size
    p = Predictor.from_folder(d, 'cpu', engine=first_engine)
    assert p.engine.exported and p.engine.graph != old
    imgs, gt = data
    assert_agrees(p.labels(imgs), Predictor.from_folder(d, 'cpu', engine='torch').labels(imgs), gt)


@needs_any
def test_read_only_folder_uses_user_cache(tmp_path, model_dir, monkeypatch, data):
    "A model folder that cannot be written: the graph goes to the user's cache, the folder is untouched"
    import shutil; d = tmp_path/'ro'; shutil.copytree(model_dir, d); shutil.rmtree(d/E.ENGINE_DIR, ignore_errors=True)
    real = E.write_atomic
    def refuse(path, data):  # what a read-only folder does, also for root (who ignores permissions)
        if str(path).startswith(str(d)): raise PermissionError(13, 'Permission denied')
        return real(path, data)
    monkeypatch.setattr(E, 'write_atomic', refuse)
    p = Predictor.from_folder(d, 'cpu', engine=first_engine)
    assert p.engine.name == first_engine and p.engine.graph.parent == E.user_cache_dir() == tmp_path/'user-cache'/'engine'
    assert not (d/E.ENGINE_DIR).exists()
    assert not Predictor.from_folder(d, 'cpu', engine=first_engine).engine.exported
    imgs, gt = data
    assert_agrees(p.labels(imgs), Predictor.from_folder(d, 'cpu', engine='torch').labels(imgs), gt)


@needs_any
def test_nowhere_to_write_falls_back(model_dir, monkeypatch, data):
    def refuse(path, data): raise PermissionError(13, 'Permission denied')
    for f in (model_dir/E.ENGINE_DIR).glob('*.onnx'): f.unlink()
    monkeypatch.setattr(E, 'write_atomic', refuse)
    with pytest.warns(UserWarning, match='cannot write the exported graph'):
        p = Predictor.from_folder(model_dir, 'cpu', engine=first_engine)
    assert p.engine.name == 'torch'


@pytest.mark.parametrize('name', ['openvino', 'onnxruntime'])
def test_missing_package_falls_back(model_dir, data, monkeypatch, name):
    "The package absent (its import fails): torch runs, with one warning per process that says why, and torch's labels"
    imgs, gt = data
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    with pytest.warns(UserWarning, match=f'{name} is not installed') as w:
        p = Predictor.from_folder(model_dir, 'cpu', engine=name)
        Predictor.from_folder(model_dir, 'cpu', engine=name)
    assert len([x for x in w if 'not installed' in str(x.message)]) == 1
    assert p.engine.name == 'torch'
    np.testing.assert_array_equal(p.labels(imgs), Predictor.from_folder(model_dir, 'cpu', engine='torch').labels(imgs))


def test_auto_without_packages_is_quiet_torch(model_dir, monkeypatch):
    for name in ('openvino', 'onnxruntime'): monkeypatch.setitem(sys.modules, name, None)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        p = Predictor.from_folder(model_dir, 'cpu')
    assert p.engine.name == 'torch'


@needs_any
def test_export_failure_falls_back(model_dir, monkeypatch):
    def fail(*a, **k): raise RuntimeError('ONNX export failed (no exporter)')
    for f in (model_dir/E.ENGINE_DIR).glob('*.onnx'): f.unlink()
    monkeypatch.setattr(E, 'export_onnx', fail)
    with pytest.warns(UserWarning, match='ONNX export failed'):
        p = Predictor.from_folder(model_dir, 'cpu', engine=first_engine)
    assert p.engine.name == 'torch'


def test_unknown_engine_refused(model_dir):
    from liver_seg.io import LiverSegError
    with pytest.raises(LiverSegError, match='unknown engine'): Predictor.from_folder(model_dir, 'cpu', engine='tensorrt')


def test_threads_follow_affinity_and_torch(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    try:
        assert E.cpu_threads() == min(len(os.sched_getaffinity(0)), n)
        torch.set_num_threads(1)
        assert E.cpu_threads() == 1
    finally: torch.set_num_threads(n)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # how predict_volumes' workers share the cores
    assert E.cpu_threads() == 1
