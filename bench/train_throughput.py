"""Training throughput: our step (bf16 autocast + channels_last, `liver_seg.train.CPUBF16`) against fastai's default
fp32 learner, resnet34 U-Net from scratch, 128 px, batch 16, on the same pre-made batches, in the same run; also
our step with `bottle=True` and with `last_cross=False` (the two cheaper full-resolution ends `train` offers).

    python bench/train_throughput.py [--steps 12] [--warmup 3] [--rounds 2] [--size 128] [--bs 16] [--threads N]

Steps of the two learners are interleaved in rounds (fp32 chunk, bf16 chunk, fp32 chunk, ...) so that load from other
users of the machine hits both alike; the ratio of median step times is the headline. Also prints the model's FLOPs per
slice (torch.utils.flop_counter) against this machine's measured fp32 and bf16 matmul rates (the 'ceiling').
Measured, never asserted.
"""
import argparse, os, statistics, sys, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent/'shared'/'data'/'ct-slices'
sys.path.insert(0, str(ROOT))


def make_batches(n, size, bs, seed=0):
    "n batches (xb, yb) of real slices (augmented, normalised, from liver_seg.data) or phantom data"
    if REAL.exists():
        from liver_seg.data import seg_dataloaders
        dls = seg_dataloaders(REAL, size=size, bs=bs, valid_cases=['6', '7'], seed=seed)
        out, it = [], iter(dls.train)
        while len(out) < n:
            try: out.append(next(it))
            except StopIteration: it = iter(dls.train)
        return out, f'real slices ({REAL})'
    from liver_seg.data import toy_slice_folder, seg_dataloaders
    import tempfile
    f = toy_slice_folder(Path(tempfile.mkdtemp())/'toy', n_cases=4, n_slices=max(8, n*bs//3 + 1), size=size)
    dls = seg_dataloaders(f, size=size, bs=bs, valid_cases=['3'])
    out = [b for _, b in zip(range(n), iter(dls.train))]
    return out, 'phantom slices (toy_slice_folder)'


def make_learner(batches, bf16, **unet_kwargs):
    from fastai.vision.all import unet_learner, resnet34, CrossEntropyLossFlat, DataLoaders
    from fastai.data.load import DataLoader
    from liver_seg.train import CPUBF16
    dl = DataLoader(batches, bs=None)
    dls = DataLoaders(dl, DataLoader(batches[:1], bs=None))
    dls.c = 3
    learn = unet_learner(dls, resnet34, n_out=3, pretrained=False, normalize=False,
                         loss_func=CrossEntropyLossFlat(axis=1), cbs=[CPUBF16()] if bf16 else [])
    if unet_kwargs: # the network `train` builds with these options (fastai's own bottle=True is broken: liver_seg.model)
        from liver_seg.model import build_model, default_config
        learn.model = build_model(default_config(arch='resnet34', size=batches[0][0].shape[-1], arch_kwargs=unet_kwargs))
    return learn


class StepTimer:
    "Time each training step (forward, loss, backward, optimizer step) of a fastai fit"
    def __init__(self): self.times = []
    def __call__(self, learn, batches):
        from fastai.callback.core import Callback
        times = self.times
        class _T(Callback):
            order = 100
            def before_batch(self): self.t = time.perf_counter()
            def after_batch(self):
                if self.training: times.append(time.perf_counter() - self.t)
            def before_validate(self):
                from fastai.callback.core import CancelValidException
                raise CancelValidException()
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3, cbs=_T())


def matmul_rate(dtype, n=2048, reps=6):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    return 2*n**3/best


def flops_per_slice(size, **unet_kwargs):
    from torch.utils.flop_counter import FlopCounterMode
    from liver_seg.model import build_model, default_config
    net = build_model(default_config(arch='resnet34', size=size, arch_kwargs=unet_kwargs)).train()
    x = torch.randn(1, 3, size, size, requires_grad=False)
    with FlopCounterMode(display=False) as fc:
        net(x).float().sum().backward()
    fwd_bwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc2, torch.no_grad():
        net.eval()(x)
    return fc2.get_total_flops(), fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=12, help='timed steps per learner (split over rounds)')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--size', type=int, default=128)
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--threads', type=int, default=None)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    from liver_seg.model import cpu_has_bf16 as cpu_bf16_fast
    from fastai.torch_core import set_seed
    print(f'CPU: {cpu_summary()}')
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability '
          f'{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_bf16_fast()}, load avg {os.getloadavg()}')
    per_round = max(1, a.steps // a.rounds)
    batches, src = make_batches(a.warmup + per_round, a.size, a.bs)
    print(f'data: {src}; {len(batches)} batches of {tuple(batches[0][0].shape)}')
    set_seed(0)
    import inspect
    from liver_seg.train import train
    default_lc = inspect.signature(train).parameters['last_cross'].default
    F32, B16, BOT, REC = 'fp32 (fastai default)', 'bf16 + channels_last (ours)', 'ours + bottle=True', 'ours + last_cross=False'
    learners = {F32: make_learner(batches, False), B16: make_learner(batches, True)}
    learners[B16].model.load_state_dict(learners[F32].model.state_dict())
    learners[BOT] = make_learner(batches, True, bottle=True)  # `train(bottle=True)`: the full-resolution block, halved
    learners[REC] = make_learner(batches, True, last_cross=False)  # `train(last_cross=False)`: opt-in unless it is the default
    times = {k: [] for k in learners}
    for r in range(a.rounds):
        for k, learn in learners.items():
            st = StepTimer(); st(learn, batches)
            times[k] += st.times[a.warmup:]   # warm-up steps of every round dropped
            print(f'  round {r+1} {k:28s}: ' + ' '.join(f'{t:.2f}' for t in st.times) + ' s/step')
    res = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        res[k] = med
        print(f'{k:28s}: median {med:.3f} s/step, mean {statistics.mean(ts):.3f}, {a.bs/med:6.1f} slices/s over {len(ts)} steps')
    f32, b16 = res[F32], res[B16]
    best = {k: min(ts) for k, ts in times.items()}
    print(f'speed-up, same network (median step time, same run): {f32/b16:.2f}x  [{cpu_summary()}]')
    print(f'speed-up, same network (fastest step of each, least disturbed by other load): '
          f"{best[F32]/best[B16]:.2f}x ({best[F32]:.2f} vs {best[B16]:.2f} s/step)")
    print(f"speed-up, bottle=True against fastai default fp32 (median): {f32/res[BOT]:.2f}x   (target >= 3.5x); "
          f'fastest steps {best[F32]/best[BOT]:.2f}x')
    if REC in res:
        print(f"speed-up, last_cross=False ({'the default' if not default_lc else 'opt-in, not the default'}) against fastai default fp32 (median): {f32/res[REC]:.2f}x   (target >= 3.5x); "
              f'fastest steps {best[F32]/best[REC]:.2f}x')
    print(f'load average at the end: {os.getloadavg()}')
    fb, fbb = flops_per_slice(a.size, bottle=True)
    print(f'network with bottle=True: {fb/1e9:.2f} GFLOP/slice forward, {fbb/1e9:.2f} forward+backward')
    if REC in res:
        fr, frb = flops_per_slice(a.size, last_cross=False)
        print(f'network with last_cross=False: {fr/1e9:.2f} GFLOP/slice forward, {frb/1e9:.2f} forward+backward')
    fwd, fwd_bwd = flops_per_slice(a.size)
    r32, r16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    print(f'model: {fwd/1e9:.2f} GFLOP/slice forward, {fwd_bwd/1e9:.2f} GFLOP/slice forward+backward (FlopCounterMode)')
    print(f'matmul rate (2048^2, best of 6): fp32 {r32/1e9:.0f} GFLOP/s, bf16 {r16/1e9:.0f} GFLOP/s ({r16/r32:.1f}x)')
    paths = [('fp32', f32, r32, fwd_bwd), ('bf16', b16, r16, fwd_bwd), ('bf16, bottle=True', res[BOT], r16, fbb)]
    if REC in res: paths.append(('bf16, last_cross=False', res[REC], r16, frb))
    for k, med, rate, fl in paths:
        achieved = fl*a.bs/med
        print(f'{k}: achieved {achieved/1e9:.0f} GFLOP/s = {achieved/rate:.0%} of the matmul ceiling '
              f'(ceiling {rate/fl:.1f} slices/s, measured {a.bs/med:.1f})')


if __name__ == '__main__':
    main()
