"Int8 graphs (liver_seg.quantize): `liver-seg quantize` and `train` make them, `predict` runs them, and a stale or damaged one is never used"
import re, shutil, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest

from liver_seg.io import read_labels
from liver_seg.synth import make_phantom_dataset

pytest.importorskip('openvino', reason="openvino is not installed (the cpu-engine extra)")
pytest.importorskip('nncf', reason="nncf is not installed (the int8 extra)")

CLI = [sys.executable, '-c', 'import sys; from liver_seg.cli import main; sys.exit(main())']
PH = dict(shape=(64, 64, 12), spacing=(2.0, 2.0, 5.0))
# int8 labels may differ from f32's in this share of voxels at most (tiny network briefly trained: many voxels near a tie)
VOXEL_TOL = 0.02


def run(*args, ok=True):
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=900)
    if ok: assert r.returncode == 0, f"liver-seg {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}"
    return r


def int8_graphs(model) -> list: return sorted(Path(model).rglob('*.int8.xml'))


@pytest.fixture(scope='module')
def q(tmp_path_factory):
    "Phantom slices and a small coarse-to-fine model trained with `--quantize`"
    tmp = tmp_path_factory.mktemp('quantize')
    make_phantom_dataset(tmp/'lits', n_cases=3, kind='lits', seed=3, **PH)
    run('prepare', tmp/'lits', tmp/'slices', '--format', 'png', '-q')
    r = run('train', tmp/'slices', '--out', tmp/'model', '--arch', 'simple_cnn', '--size', 64, '--epochs', 6, '--lr', 0.01, '--bs', 8,
            '--no-pretrained', '--valid-cases', 'volume-2', '--quantize', '-q')  # six epochs: enough to find the phantom's liver
    assert [g.parent for g in int8_graphs(tmp/'model')] == [tmp/'model'/'.engine']  # --quantize: the fine stage's; the coarse stage runs f32
    assert r.stdout.splitlines()[-1] == f"model folder: {tmp/'model'}"
    return tmp


def test_quantize_command_then_predict_int8(q, tmp_path):
    "`liver-seg quantize` writes the fine stage's int8 graph; `predict --engine openvino-int8` runs it (the coarse stage f32), close to f32's labels; 'auto' runs f32"
    m = tmp_path/'m'; shutil.copytree(q/'model', m, ignore=shutil.ignore_patterns('.engine'))
    r = run('quantize', m, q/'slices', '--slices', 64)
    graphs = int8_graphs(m)
    assert [g.parent for g in graphs] == [m/'.engine']
    first, last = r.stdout.splitlines()[0], r.stdout.splitlines()[-1]
    assert first.startswith(f'calibrating {m}: 64 inputs of its fine stage, drawn while predicting every case of ') and last == f'int8 graph in {last.split()[3]} s: {graphs[0]}'
    assert "agree with f32's labels within 0.001" in first  # accuracy control is the default
    steps = r.stdout.splitlines()[1:-1]  # what the minutes between hold: a line per stage and per step, with the time so far
    assert all(re.match(r'\[\d+:\d\d\] ', l) for l in steps), steps
    assert re.fullmatch(r'\[\d+:\d\d\] (64 calibration inputs|\d\d? calibration inputs \(all there were\)) drawn in \d+ s; quantizing with accuracy control', steps[0]), steps
    assert steps[1].split('] ')[1].startswith("every layer int8: labels agree with f32's at "), steps
    assert all(g.with_suffix('.bin').stat().st_size > 0 for g in graphs)
    vol = q/'lits'/'volume-2.nii.gz'  # the validation case: never trained on
    labels = {}
    for e in ('openvino', 'openvino-int8', 'auto'):
        r = run('predict', m, vol, tmp_path/f'{e}.nii.gz', '--engine', e, '-q')
        assert 'warning' not in r.stderr, r.stderr  # the int8 graphs are found: no fallback
        labels[e] = read_labels(tmp_path/f'{e}.nii.gz').array
    assert (labels['openvino'] > 0).sum() > 0
    same = (labels['openvino-int8'] == labels['openvino']).mean()
    assert 1 - same <= VOXEL_TOL, same
    assert np.array_equal(labels['auto'], labels['openvino'])  # int8 is opt-in: the graph that keeps the Dice is 1.1-1.3x f32 on real CT


def fake_quantize_ops(graph) -> int:
    import openvino as ov
    return [op.get_type_name() for op in ov.Core().read_model(str(graph)).get_ops()].count('FakeQuantize')


def test_quantize_plain_puts_every_layer_in_int8(q, tmp_path):
    "`--plain` skips accuracy control: it says nothing of f32 layers, and its graph has more int8 inputs than the controlled one"
    controlled = int8_graphs(q/'model')  # train --quantize: accuracy control
    m = tmp_path/'m'; shutil.copytree(q/'model', m, ignore=shutil.ignore_patterns('.engine'))
    r = run('quantize', m, q/'slices', '--slices', 64, '--plain')
    assert 'f32' not in r.stdout.splitlines()[0], r.stdout
    assert re.fullmatch(r'\[\d+:\d\d\] (64 calibration inputs|\d\d? calibration inputs \(all there were\)) drawn in \d+ s; quantizing every layer', r.stdout.splitlines()[1]), r.stdout
    assert 'labels agree' not in r.stdout, r.stdout  # no accuracy control: nothing validated
    plain = int8_graphs(m)
    assert len(plain) == len(controlled) == 1 and fake_quantize_ops(plain[0]) > fake_quantize_ops(controlled[0])


def test_quantize_refuses_bad_input_and_writes_nothing(q, tmp_path):
    "Missing calibration data, or a folder that is no model: one line naming it, status 2, no graph written"
    m = tmp_path/'m'; shutil.copytree(q/'model', m, ignore=shutil.ignore_patterns('.engine'))
    r = run('quantize', m, tmp_path/'nothing', ok=False)
    assert r.returncode == 2 and r.stderr.strip() == f"liver-seg quantize: {tmp_path/'nothing'}: no such file or folder"
    (tmp_path/'empty').mkdir()
    r = run('quantize', tmp_path/'empty', q/'slices', ok=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(tmp_path/'empty') in r.stderr
    assert int8_graphs(m) == [] and int8_graphs(tmp_path/'empty') == []


@pytest.fixture
def quantized(q, tmp_path):
    "A copy of the model with its int8 graphs"
    m = tmp_path/'m'; shutil.copytree(q/'model', m, ignore=shutil.ignore_patterns('.engine'))
    from liver_seg.quantize import quantize_model
    quantize_model(m, q/'slices', n=32)
    return m


def engines(m, engine):
    "repr of each stage's engine of model folder `m`, and the warnings that loading it gave"
    from liver_seg.predictor import Predictor, coarse_stage
    from liver_seg import engine as E
    E._WARNED.clear()  # each warning comes once per process: these tests share one
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        p = Predictor.from_folder(m, 'cpu', engine=engine)
        got = [repr(p.engine), repr(coarse_stage(p).engine)]
    return got, [str(x.message) for x in w]


def test_new_weights_never_meet_an_old_int8_graph(quantized):
    "Weights written again (a retrain with --force) name other graphs: the old int8 graph is not used, and the next export removes it"
    import torch
    from liver_seg.model import read_weights, model_from_state, write_model_files
    from liver_seg.config import read_config
    old = int8_graphs(quantized)
    cfg = read_config(quantized)
    net = model_from_state(read_weights(quantized), cfg, quantized)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.01)
    write_model_files(net, cfg, quantized)  # the fine stage's weights only
    got, said = engines(quantized, 'openvino-int8')
    assert got == ['openvino f32', 'openvino f32']
    assert len(said) == 1 and 'no int8 graph for these weights' in said[0] and 'liver-seg quantize' in said[0]
    assert len(old) == 1 and not old[0].exists()  # the fine stage's new f32 export removed its stale int8 graph


@pytest.mark.parametrize('part', ['graph', 'weights'])
def test_damaged_int8_graph_falls_back_to_f32(quantized, part):
    "A damaged int8 graph runs the f32 graph: with a warning when int8 was asked for, quietly for 'auto'"
    g = int8_graphs(quantized)[0]
    f = g if part == 'graph' else g.with_suffix('.bin')
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 3])
    got, said = engines(quantized, 'openvino-int8')
    assert got == ['openvino f32', 'openvino f32'] and len(said) == 1 and said[0].startswith('openvino-int8: '), said
    got, said = engines(quantized, 'auto')
    assert got[0] == 'openvino f32' and said == []


def test_int8_on_a_cpu_without_vnni_runs_and_says_so(quantized, monkeypatch):
    "Where the CPU has no int8 instructions, int8 asked for by name still runs, with a warning that it may be slower than f32"
    from liver_seg import engine as E
    monkeypatch.setattr(E, 'cpu_has_int8', lambda: False)
    got, said = engines(quantized, 'openvino-int8')
    assert got == ['openvino int8', 'openvino f32'] and len(said) == 1 and 'no int8 dot-product instructions' in said[0], said


def test_the_coarse_stage_runs_f32_under_int8(q, quantized):
    "A coarse stage's int8 graph (session 16 wrote them) is not used, and not asked for: its box decides every crop of the fine stage"
    from liver_seg.predictor import Predictor
    from liver_seg.quantize import calibration_inputs, model_stages, quantize_graph
    from liver_seg.engine import INT8_GRAPH
    pred = Predictor.from_folder(quantized, 'cpu', engine='openvino')
    g = Path(model_stages(pred)[1].engine.graph)
    quantize_graph(g, calibration_inputs(pred, q/'slices', n=16)[1], g.with_name(g.name.removesuffix('.onnx') + INT8_GRAPH), max_drop=None)
    assert len(int8_graphs(quantized)) == 2
    got, said = engines(quantized, 'openvino-int8')
    assert got == ['openvino int8', 'openvino f32'] and said == [], said
