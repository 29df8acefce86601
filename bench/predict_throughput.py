"""Volume prediction throughput and memory: `liver-seg predict` against the seed's way, in the same run.

    python bench/predict_throughput.py [--slices 100] [--size 128] [--big 1000] [--no-big] [--workdir DIR]
    python bench/predict_throughput.py --no-small --big 1000 --big-model DEMO/model   # memory with a trained model
    python bench/predict_throughput.py --engines --no-small --no-big [--rounds 8]     # forward pass through each CPU engine
    python bench/predict_throughput.py --no-big --model MODEL --volume ../shared/data/ircadb-hu/3Dircadb1.1/PATIENT_DICOM
                                                      # the default recipe (a trained coarse-to-fine model) on real CT

A synthetic 512 x 512 x N int16 NIfTI (liver_seg.synth phantom) is segmented by an untrained resnet34 U-Net at 128 px
(speed only, so untrained weights are fine):

- ours: `liver-seg predict MODEL_DIR IN.nii.gz OUT.nii.gz` (full resolution output in the input's geometry,
  post-processed, written as NIfTI; config precision bf16 when this CPU has native bf16, else fp32), and the same
  through `predict_path` in a Python child timed around the call (imports excluded); both with `engine='auto'`
  (`liver_seg.engine`: OpenVINO f32 when installed), and a row with `engine='torch'`, the way before the engine;
- the seed's way: `load_learner` on a `learner.pkl` (seed-style DataBlock, `Resize(128)`, `IntToFloatTensor`,
  `Normalize`), `read_nii` with `get_fdata` + `rot90`, per-slice `to_nchan` + `byte`, `test_dl` + `get_preds` (fp32),
  argmax left at 128 px.

Each runs in its own child process; wall times are end to end (start-up, imports, model load, reading, prediction,
and for ours post-processing and writing). Peak RSS is each child's `ru_maxrss` (measured by a wrapper process
with `resource.getrusage(RUSAGE_CHILDREN)`). Then peak RSS of ours on a 512 x 512 x `--big` int16 volume, with the untrained
model or with `--big-model` (a trained model folder such as `liver-seg demo`'s, whose liver-sized output is what
post-processing meets in use). Also prints the forward-pass ceiling of each network and post-processing on realistic labels.
With `--engines`, first a forward-pass table of the default network (batch 16): torch fp32, fp32 channels_last,
bf16 autocast + channels_last, ONNX Runtime and OpenVINO f32 / bf16, in one process, rounds interleaved.
With `--model`, ours is that trained model folder (the default recipe is coarse to fine: its work depends on where
it finds the liver, so an untrained network says nothing), and with `--volume` the volume is a real one (a NIfTI
file, or a DICOM series converted to NIfTI in the work folder first, outside every timing); the seed's learner
stays untrained, since its cost does not depend on its weights.
Measured, never asserted: the machine is shared, timings are noisy.
"""
import argparse, json, os, subprocess, sys, tempfile, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
CODES = np.array(["background", "liver", "tumor"])
WINS = [(150, 30), (200, 60)]


def label_func(x):
    "The seed's label function (importable, so the exported learner unpickles in a child)"
    return Path(x).parent.parent/'train_masks'/f'{Path(x).stem}_mask.png'


def make_seed_learner(folder, size=128, n=24):
    "Export a seed-style learner.pkl (DataBlock from a few phantom slice JPGs, unet_learner resnet34, untrained)"
    from fastai.vision.all import (DataBlock, ImageBlock, MaskBlock, Resize, IntToFloatTensor, Normalize, RandomSplitter,
                                   get_image_files, unet_learner, resnet34, CrossEntropyLossFlat)
    from liver_seg.synth import make_phantom
    from liver_seg.windows import volume_channels
    from PIL import Image
    folder, size, n = Path(folder), int(size), int(n)
    (folder/'train_images').mkdir(parents=True, exist_ok=True); (folder/'train_masks').mkdir(exist_ok=True)
    hu, lab, _ = make_phantom((512, 512, n), seed=0)
    ch = volume_channels(hu, windows=WINS)
    for k in range(n):
        Image.fromarray(ch[k]).save(folder/'train_images'/f'volume-0_slice_{k}.jpg', quality=95)
        Image.fromarray(np.rot90(lab[:, :, k]).copy()).save(folder/'train_masks'/f'volume-0_slice_{k}_mask.png')
    db = DataBlock(blocks=(ImageBlock(), MaskBlock(CODES)), batch_tfms=[IntToFloatTensor(), Normalize()],
                   splitter=RandomSplitter(seed=0), item_tfms=[Resize(size)], get_items=get_image_files, get_y=label_func)
    dls = db.dataloaders(folder/'train_images', bs=16, num_workers=0)
    learn = unet_learner(dls, resnet34, loss_func=CrossEntropyLossFlat(axis=1), pretrained=False)
    learn.export(folder/'learner.pkl')
    return str(folder/'learner.pkl')


def seed_predict(pkl, nii):
    "The seed's prediction of one NIfTI volume; returns (seconds without imports/load_learner, mask shape)"
    import torch, nibabel as nib
    from fastai.vision.all import load_learner, tensor, TensorImage
    from fastai.medical.imaging import dicom_windows  # noqa: F401 (patches Tensor.to_nchan)
    learn = load_learner(pkl, cpu=True)
    t0 = time.perf_counter()
    arr = np.rot90(np.array(nib.load(str(nii)).get_fdata()))
    slices = []
    for k in range(arr.shape[2]):
        data = tensor(arr[:, :, k].astype(np.float32))
        slices.append(TensorImage((data.to_nchan(WINS)*255).byte()))
    dl = learn.dls.test_dl(slices)
    preds, _ = learn.get_preds(dl=dl)
    mask = np.argmax(preds, axis=1)
    return time.perf_counter() - t0, tuple(mask.shape)


def ours_predict(model_dir, nii, out, post='1', engine='auto'):
    "predict_path timed around the call (model load, reading, prediction, post-processing unless post='0', writing)"
    from liver_seg.predict import predict_path
    t0 = time.perf_counter()
    predict_path(model_dir, nii, out, force=True, progress=False, postprocess=post == '1', engine=engine)
    return time.perf_counter() - t0


def measured(cmd):
    "Run `cmd` under a wrapper process; returns (wall seconds, peak RSS MB of the command, its stdout)"
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter();"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); dt = time.perf_counter() - t;"
               "print(json.dumps(dict(rc=r.returncode, wall=dt, rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
               "out=r.stdout[-2000:], err=r.stderr[-2000:])))")
    r = subprocess.run([sys.executable, '-c', wrapper, *map(str, cmd)], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res['rc'] != 0: raise RuntimeError(f"{cmd} failed: {res['err']}")
    return res['wall'], res['rss'], res['out']


def child(fn, *args):
    "Command that runs `fn(*args)` of this module in a fresh Python and prints its JSON result"
    code = (f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); sys.path.insert(0, {str(ROOT)!r});"
            f"import predict_throughput as b; print(json.dumps(b.{fn}(*sys.argv[1:])))")
    return [sys.executable, '-c', code, *args]


def write_volume(path, n, seed=0, tile=None):
    "A 512 x 512 x n int16 phantom NIfTI (tiled along z from `tile` slices when given, to save time)"
    from liver_seg.synth import make_phantom, phantom_affine
    import nibabel as nib
    hu, _, aff = make_phantom((512, 512, tile or n), seed=seed)
    if tile: hu = np.concatenate([hu] * (n // tile + 1), axis=2)[:, :, :n]; aff = phantom_affine((512, 512, n))
    img = nib.Nifti1Image(hu, aff); img.header.set_qform(aff, 1); img.header.set_sform(aff, 1)
    nib.save(img, str(path))
    return path


def realistic_postprocess(n):
    "Post-processing time on a trained model's kind of output: the phantom's own labels (one liver, a few tumours)"
    from liver_seg.synth import make_phantom
    from liver_seg.postprocess import postprocess
    _, lab, _ = make_phantom((512, 512, n), seed=0)
    lab = lab.astype(np.uint8)
    t = time.perf_counter(); postprocess(lab, spacing=(0.8, 0.8, 2.5), out=lab); dt = time.perf_counter() - t
    print(f"post-processing of realistic labels (the phantom's ground truth, 512 x 512 x {n}): {dt:.2f} s "
          f"(the untrained network's noise above is its worst case)")


def network_seconds(model_dir, n, size, bs=16, engine='torch'):
    "In-process time of the network alone (Predictor.scores: normalise, bf16/fp32 forward) on n slices at model size"
    from liver_seg.predict import Predictor
    pred = Predictor.from_folder(model_dir, engine=engine)
    imgs = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
    pred.scores(imgs)
    t = time.perf_counter()
    for _ in range(-(-n // bs)): pred.scores(imgs)
    return time.perf_counter() - t


def ceiling(size, n, seed_inner, rows, prec, dirs):
    "The network's forward FLOPs per slice over this machine's matmul rates: the fastest each path could be"
    import torch
    from train_throughput import flops_per_slice, matmul_rate
    r32, r16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    rate = r16 if prec == 'bf16' else r32
    print(f"\nceiling: matmul (2048^2, best of 6) fp32 {r32/1e9:.0f} GFLOP/s, bf16 {r16/1e9:.0f} GFLOP/s ({r16/r32:.1f}x)")
    for (name, kw, inner), d in zip([('default network', {}, rows[2][2]), ('bottle=True', {'bottle': True}, rows[4][2]),
                                     ('last_cross=False', {'last_cross': False}, rows[3][2])], dirs):
        f = flops_per_slice(size, **kw)[0]
        if not kw: print(f"  seed (fp32, default network): {f/1e9:.2f} GFLOP/slice forward -> its network alone needs >= "
                         f"{n*f/r32:.1f} s per {n} slices at the fp32 ceiling; measured {seed_inner:.1f} s for everything")
        best, net = n*f/rate, network_seconds(d, n, size)
        print(f"  ours, {name} ({prec}): {f/1e9:.2f} GFLOP/slice forward -> >= {best:.1f} s per {n} slices at the ceiling; "
              f"network measured {net:.1f} s ({f*n/net/rate:.0%} of the ceiling) of {inner:.1f} s for everything; "
              f"the seed's {seed_inner:.1f} s over a network at the ceiling and nothing else: {seed_inner/best:.1f}x at most")


def engine_forward(size=128, bs=16, rounds=5, reps=2, arch_kwargs=None, work=None):
    """Forward-pass rates (slices/s) of one network through every CPU path, in this process, rounds interleaved.

    torch fp32 / fp32 channels_last / bf16 autocast + channels_last, ONNX Runtime (CPU EP), OpenVINO with
    INFERENCE_PRECISION_HINT f32 and bf16, and OpenVINO running an int8 graph (`liver_seg.quantize`), all on the same random batch of `bs` slices at `size` px, threads = the
    cores this process may use. Each round times `reps` batches of every path in turn, so a burst of load on the
    shared machine hits all of them, in a new order each round; the median and the best round are printed."""
    import statistics, torch
    from liver_seg.model import build_model, default_config
    from liver_seg.engine import cpu_threads, export_onnx, write_atomic
    threads = cpu_threads(); torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model(default_config(arch='resnet34', size=size, arch_kwargs=arch_kwargs or {})).eval()
    x = torch.randn(bs, 3, size, size)
    work = Path(work or tempfile.mkdtemp(prefix='engine_bench_'))
    onnx = write_atomic(work/'net.onnx', export_onnx(net, size))
    paths = {}
    with torch.inference_mode():
        ref = net(x)
        paths['torch fp32'] = lambda: net(x)
        net_cl = build_model(default_config(arch='resnet34', size=size, arch_kwargs=arch_kwargs or {})).eval()
        net_cl.load_state_dict(net.state_dict()); net_cl = net_cl.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        paths['torch fp32 channels_last'] = lambda: net_cl(x_cl)
        def bf16():
            with torch.autocast('cpu', dtype=torch.bfloat16): return net_cl(x_cl).float()
        paths['torch bf16 autocast + channels_last'] = bf16
    xn = x.numpy()
    try:
        import onnxruntime as ort
        so = ort.SessionOptions(); so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')  # as liver_seg.engine: no pool spinning into the next path's time
        sess = ort.InferenceSession(str(onnx), so, providers=['CPUExecutionProvider'])
        paths[f'ONNX Runtime {ort.__version__} (CPU EP)'] = lambda: sess.run(None, {'x': xn})[0]
    except ImportError: print("onnxruntime not installed: no row")
    try:
        import openvino as ov
        core = ov.Core()
        for hint in ('f32', 'bf16'):
            req = core.compile_model(str(onnx), 'CPU', {'INFERENCE_PRECISION_HINT': hint, 'INFERENCE_NUM_THREADS': threads,
                                                        'PERFORMANCE_HINT': 'LATENCY'}).create_infer_request()
            paths[f'OpenVINO {ov.__version__.split("-")[0]} {hint}'] = (lambda r: lambda: r.infer({0: xn})[0])(req)
        try:  # int8: calibrated on the batch itself (speed needs no calibration; agreement on real CT: bench/engine_agreement.py)
            from liver_seg.quantize import quantize_graph
            q = quantize_graph(onnx, np.ascontiguousarray(np.concatenate([xn, xn[:, :, ::-1]])), work/'net.int8.xml')
            req8 = core.compile_model(str(q), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32', 'INFERENCE_NUM_THREADS': threads,
                                                      'PERFORMANCE_HINT': 'LATENCY'}).create_infer_request()
            paths[f'OpenVINO {ov.__version__.split("-")[0]} int8 (NNCF)'] = lambda: req8.infer({0: xn})[0]
        except ImportError: print("nncf not installed: no int8 row")
    except ImportError: print("openvino not installed: no rows")
    diffs = {}
    with torch.inference_mode():
        for k, f in paths.items():  # warm-up, and how far each path's logits are from torch fp32
            out = torch.as_tensor(np.asarray(f())).float()
            diffs[k] = ((out - ref).abs().max().item(), (out.argmax(1) == ref.argmax(1)).float().mean().item())
        times = {k: [] for k in paths}
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            for k in rng.permutation(list(paths)):  # a new order each round: no path always follows the same one
                f = paths[k]
                t = time.perf_counter()
                for _ in range(reps): f()
                times[k].append(bs * reps / (time.perf_counter() - t))
    print(f"\nforward only, resnet34 U-Net{' ' + str(arch_kwargs) if arch_kwargs else ''} (untrained), batch {bs} at {size} px, "
          f"{threads} threads, {rounds} interleaved rounds of {reps} batches, load average {os.getloadavg()[0]:.1f}  [{cpu_summary()}]")
    base = statistics.median(times['torch fp32'])
    print(f"{'path':42s} {'median':>8s} {'best':>7s} {'x fp32':>7s} {'max |logit diff|':>17s} {'argmax agree':>13s}")
    for k, v in times.items():
        print(f"{k:42s} {statistics.median(v):8.2f} {max(v):7.2f} {statistics.median(v)/base:6.2f}x {diffs[k][0]:17.2e} {diffs[k][1]:13.4%}")
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--slices', type=int, default=100)
    ap.add_argument('--size', type=int, default=128)
    ap.add_argument('--big', type=int, default=1000)
    ap.add_argument('--no-big', action='store_true')
    ap.add_argument('--workdir', default=None)
    ap.add_argument('--big-model', default=None, help="trained model folder for the --big runs (e.g. `liver-seg demo OUT`'s OUT/model): realistic post-processing")
    ap.add_argument('--no-small', action='store_true', help='skip the comparison with the seed (only the --big memory runs)')
    ap.add_argument('--engines', action='store_true', help='first the forward-pass table: torch fp32/channels_last/bf16, ONNX Runtime, OpenVINO f32/bf16')
    ap.add_argument('--rounds', type=int, default=5, help='interleaved rounds of the --engines table')
    ap.add_argument('--model', default=None, help='a trained model folder (e.g. the default recipe, coarse to fine) for ours, instead of untrained networks')
    ap.add_argument('--volume', default=None, help='segment this NIfTI file or DICOM series instead of the phantom (not committed: outside the repository)')
    a = ap.parse_args()
    if a.volume and not a.model: ap.error('--volume needs --model (the untrained comparison counts --slices phantom slices)')
    import torch
    from liver_seg.model import cpu_has_bf16
    work = Path(a.workdir or tempfile.mkdtemp(prefix='predict_bench_'))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_summary()}")
    print(f"CPU threads {torch.get_num_threads()}, native bf16: {cpu_has_bf16()}, load average {os.getloadavg()[0]:.1f}, work dir {work}")
    prec = 'bf16' if cpu_has_bf16() else 'fp32'
    if a.engines: engine_forward(a.size, rounds=a.rounds, work=work)
    folders = None  # the untrained model folders, made only for the runs that use them
    if not a.no_small and a.model: compare_trained(a, work, Path(a.model))
    elif not a.no_small:
        folders = untrained_folders(a, work, prec)
        compare(a, work, *folders, prec)
    if not a.no_big:
        big = write_volume(work/'big.nii.gz', a.big, tile=50)
        big_model = a.big_model or (folders or untrained_folders(a, work, prec))[0]
        print(f"\nours on 512 x 512 x {a.big} int16 (the int16 input alone is {512*512*a.big*2/2**20:.0f} MB), model {big_model}"
              f"{'' if a.big_model else ' (untrained: noise, the worst case for post-processing)'}:")
        for extra in ([], ['--no-postprocess']):
            w, rss, _ = measured(['liver-seg', 'predict', big_model, big, work/'big_pred.nii.gz', '--force', *extra])
            print(f"  liver-seg predict {' '.join(extra):18s} {w:5.0f} s ({a.big/w:.1f} slices/s), peak RSS {rss:.0f} MB ({rss/1024:.2f} GB)")
            if not extra:
                import nibabel as nib
                lab = np.asarray(nib.load(str(work/'big_pred.nii.gz')).dataobj)
                print(f"    predicted foreground: {(lab > 0).mean():.1%} of the voxels")


def untrained_folders(a, work, prec):
    "Untrained resnet34 U-Net model folders at --size: the default network, the other `last_cross`, `bottle=True`; and the default `last_cross`"
    import inspect, torch
    from liver_seg.model import build_model, default_config, save_model_folder
    from liver_seg.train import train
    default_lc = inspect.signature(train).parameters['last_cross'].default  # what `liver-seg train` builds
    cfg = default_config(arch='resnet34', size=a.size, precision=prec,
                         input={'kind': 'hu_windows', 'windows': [list(w) for w in WINS], 'freqhist': True, 'context': 0})
    cfg_other = dict(cfg, arch_kwargs={'last_cross': not default_lc})   # the other network: opt-in, or the seed's
    if not default_lc: cfg = dict(cfg, arch_kwargs={'last_cross': False})
    cfg_bottle = dict(cfg, arch_kwargs={'bottle': True})   # `train(bottle=True)`: the full-resolution block, halved
    torch.manual_seed(0)
    return (save_model_folder(build_model(cfg), cfg, work/'model', force=True),
            save_model_folder(build_model(cfg_other), cfg_other, work/'model_other', force=True),
            save_model_folder(build_model(cfg_bottle), cfg_bottle, work/'model_bottle', force=True), default_lc)


def print_rows(rows, n, width):
    "The table of (method, wall s, inner s or None, peak RSS MB) rows for an `n`-slice volume"
    print(f"\n{'method':{width}s} {'wall s':>7s} {'slices/s':>9s} {'inner s':>8s} {'slices/s':>9s} {'RSS MB':>7s}")
    for name, w, inner, rss in rows:
        ins = f"{inner:8.1f} {n/inner:9.2f}" if inner else f"{'-':>8s} {'-':>9s}"
        print(f"{name:{width}s} {w:7.1f} {n/w:9.2f} {ins} {rss:7.0f}")


def volume_nifti(a, work):
    "The NIfTI the comparison segments: `--volume` (a DICOM series converted first), else a phantom of `--slices` slices"
    if not a.volume: return write_volume(work/'volume.nii.gz', a.slices)
    src = Path(a.volume)
    if src.is_file() and src.name.endswith(('.nii', '.nii.gz')): return src
    import nibabel as nib
    from liver_seg.dicom import read_dicom_series
    vol = read_dicom_series(src)
    img = nib.Nifti1Image(vol.array, vol.affine); img.header.set_qform(vol.affine, 1); img.header.set_sform(vol.affine, 1)
    nib.save(img, str(work/'volume.nii.gz'))
    return work/'volume.nii.gz'


def seed_learner(a, work):
    "The seed's exported learner.pkl (untrained), made in a child process"
    pkl_dir = work/'seed'
    r = subprocess.run(child('make_seed_learner', str(pkl_dir), str(a.size)), capture_output=True, text=True)
    if r.returncode: sys.exit(f"making the seed's learner.pkl failed:\n{r.stderr[-3000:]}")
    return pkl_dir/'learner.pkl'


def compare_trained(a, work, model):
    "The seed's way against a trained model folder (the default recipe) on one volume, each in a child process"
    import nibabel as nib
    from liver_seg.predictor import get_predictor, coarse_stage
    nii, pkl = volume_nifti(a, work), seed_learner(a, work)
    n = nib.load(str(nii)).shape[2]
    t = time.perf_counter(); pred = get_predictor(model, 'cpu'); coarse = coarse_stage(pred)
    print(f"model {model}: fine {pred!r}" + (f", coarse {coarse!r}" if coarse else '') +
          f"; loaded (graphs exported once where missing) in {time.perf_counter() - t:.1f} s, before any timing")
    print(f"volume {nii} {nib.load(str(nii)).shape}")
    rows = []
    w, rss, out = measured(child('seed_predict', str(pkl), str(nii)))
    rows.append(('seed: load_learner + to_nchan + test_dl/get_preds (fp32, 128 px out)', w, json.loads(out.strip().splitlines()[-1])[0], rss))
    w, rss, _ = measured(['liver-seg', 'predict', model, nii, work/'pred_cli.nii.gz', '--force'])
    rows.append(("ours: liver-seg predict (engine 'auto', full-res NIfTI, post-processed)", w, None, rss))
    for tag, post, engine in (("engine 'auto'", '1', 'auto'), ("engine 'auto', no post-processing", '0', 'auto'), ("engine='torch'", '1', 'torch')):
        w, rss, out = measured(child('ours_predict', str(model), str(nii), str(work/'pred_py.nii.gz'), post, engine))
        rows.append((f"ours: predict_path ({tag})", w, float(out.strip().splitlines()[-1]), rss))
    int8 = any(Path(model).rglob('*.int8.xml'))  # int8 graphs (`liver-seg quantize`): the opt-in engine, last
    if int8:
        w, rss, _ = measured(['liver-seg', 'predict', model, nii, work/'pred_int8.nii.gz', '--force', '--engine', 'openvino-int8'])
        rows.append(("ours: liver-seg predict --engine openvino-int8 (opt-in)", w, None, rss))
    lab = np.asarray(nib.load(str(work/'pred_cli.nii.gz')).dataobj)
    zs = np.flatnonzero(lab.reshape(-1, lab.shape[2]).any(0))
    print_rows(rows, n, 72)
    print(f"ours labelled {(lab > 0).mean():.1%} of the voxels foreground, in slices {zs.min() if len(zs) else '-'}-{zs.max() if len(zs) else '-'} of {n}")
    seed_w, seed_in = rows[0][1], rows[0][2]
    print(f"\nspeed-up over the seed, end to end (whole child process): liver-seg predict {seed_w/rows[1][1]:.1f}x, "
          f"predict_path {seed_w/rows[2][1]:.1f}x, without post-processing {seed_w/rows[3][1]:.1f}x, engine='torch' {seed_w/rows[4][1]:.1f}x  [{cpu_summary()}]")
    if int8: print(f"int8 graphs (--engine openvino-int8): liver-seg predict {seed_w/rows[-1][1]:.1f}x the seed, {rows[1][1]/rows[-1][1]:.2f}x engine 'auto'")
    print(f"speed-up, timed region only (seed without imports/load_learner vs the predict_path call): {seed_in/rows[2][2]:.1f}x, "
          f"without post-processing {seed_in/rows[3][2]:.1f}x, engine='torch' {seed_in/rows[4][2]:.1f}x")


def compare(a, work, model_dir, other_dir, bottle_dir, default_lc, prec):
    "The seed's way against ours on the --slices volume, each in a child process, and the ceiling"
    nii, pkl = volume_nifti(a, work), seed_learner(a, work)
    from liver_seg.predictor import get_predictor
    for d in (model_dir, other_dir, bottle_dir):  # the engine's graph is exported once per model folder, before any timing
        t = time.perf_counter(); eng = get_predictor(d, 'cpu').engine
        print(f"engine 'auto' for {d.name}: {eng!r}, graph {'exported and compiled' if getattr(eng, 'exported', False) else 'compiled'} in {time.perf_counter() - t:.1f} s (once per model folder)")
    auto = repr(get_predictor(model_dir, 'cpu').engine)
    print(f"volume 512 x 512 x {a.slices} int16, resnet34 U-Net at {a.size} px (untrained), ours precision {prec}, engine 'auto': {auto}")
    rows = []
    w, rss, out = measured(child('seed_predict', str(pkl), str(nii)))
    inner, shape = json.loads(out.strip().splitlines()[-1])
    rows.append(('seed: load_learner + to_nchan + test_dl/get_preds (fp32, 128 px out)', w, inner, rss))
    net = f'default network: last_cross={default_lc}'
    w, rss, _ = measured(['liver-seg', 'predict', model_dir, nii, work/'pred_cli.nii.gz', '--force'])
    rows.append((f'ours: liver-seg predict ({prec}, {auto}, full-res NIfTI, post-processed; {net})', w, None, rss))
    w, rss, out = measured(child('ours_predict', str(model_dir), str(nii), str(work/'pred_py.nii.gz')))
    rows.append((f'ours: predict_path in Python ({prec}, {auto}; {net})', w, float(out.strip().splitlines()[-1]), rss))
    w, rss, out = measured(child('ours_predict', str(other_dir), str(nii), str(work/'pred_other.nii.gz')))
    rows.append((f"ours: predict_path ({prec}; last_cross={not default_lc}{', opt-in' if default_lc else ', the seed network'})", w, float(out.strip().splitlines()[-1]), rss))
    w, rss, out = measured(child('ours_predict', str(bottle_dir), str(nii), str(work/'pred_bottle.nii.gz')))
    rows.append((f"ours: predict_path ({prec}; bottle=True, opt-in)", w, float(out.strip().splitlines()[-1]), rss))
    w, rss, out = measured(child('ours_predict', str(other_dir if default_lc else model_dir), str(nii), str(work/'pred_nopost.nii.gz'), '0'))
    rows.append((f"ours: predict_path ({prec}; last_cross=False; no post-processing, like the seed)", w, float(out.strip().splitlines()[-1]), rss))
    w, rss, out = measured(child('ours_predict', str(model_dir), str(nii), str(work/'pred_torch.nii.gz'), '1', 'torch'))
    rows.append((f"ours: predict_path, engine='torch' ({prec}; {net})", w, float(out.strip().splitlines()[-1]), rss))
    print_rows(rows, a.slices, 78)
    seed_w, seed_in = rows[0][1], rows[0][2]
    print(f"\nspeed-up, end to end (whole child process): liver-seg predict {seed_w/rows[1][1]:.1f}x, predict_path {seed_w/rows[2][1]:.1f}x  [{cpu_summary()}]")
    print(f"speed-up, timed region only (seed without imports/load_learner vs predict_path call): {seed_in/rows[2][2]:.1f}x")
    print(f"with last_cross={not default_lc}: end to end {seed_w/rows[3][1]:.1f}x, timed region {seed_in/rows[3][2]:.1f}x")
    print(f"bottle=True: end to end {seed_w/rows[4][1]:.1f}x, timed region {seed_in/rows[4][2]:.1f}x")
    print(f"last_cross=False without post-processing: end to end {seed_w/rows[5][1]:.1f}x, timed region {seed_in/rows[5][2]:.1f}x")
    print(f"engine='torch' (the way before liver_seg.engine): end to end {seed_w/rows[6][1]:.1f}x, timed region {seed_in/rows[6][2]:.1f}x; "
          f"engine 'auto' ({auto}) over torch: {rows[6][2]/rows[2][2]:.2f}x timed region, {rows[6][1]/rows[2][1]:.2f}x end to end")
    realistic_postprocess(a.slices)
    ceiling(a.size, a.slices, seed_in, rows, prec, [model_dir, bottle_dir, other_dir])


if __name__ == '__main__': main()
