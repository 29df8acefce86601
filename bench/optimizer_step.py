"""One optimizer step on the default network (ResNet-34 U-Net, halved last block): fastai's `Adam` against
`liver_seg.optimizer.FusedAdam`, on the same parameters and gradients, in one process.

    python bench/optimizer_step.py [--steps 20]

Both optimizers get the parameter groups `train` gives them (the encoder's split) and fastai's `do_wd=False` on norm
layers and biases, as a `Learner` sets it; both with the parameters contiguous (fp32 training) and in `channels_last`
(bf16 training on the CPU, `CPUBF16`). The CPU and its flags are printed beside the ratios. Measured, never asserted.
"""
import argparse, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary  # noqa: E402


def seconds_per_step(opt, steps:int) -> float:
    "Mean wall seconds of `opt.step()` over `steps` steps, after one warm-up step"
    opt.step()
    t0 = time.perf_counter()
    for _ in range(steps): opt.step()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=20, help='steps timed per optimizer')
    a = ap.parse_args()
    import torch
    from fastai.optimizer import Adam
    from fastai.torch_core import norm_bias_params
    from liver_seg.model import build_model, default_config, encoder_arch
    from liver_seg.optimizer import FusedAdam
    cfg = dict(default_config(arch='resnet34', size=128, n_in=3, n_out=3), arch_kwargs={'bottle': True})
    print(f"{cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        model = build_model(cfg, None).to(memory_format=layout)
        torch.manual_seed(0)
        for p in model.parameters(): p.grad = torch.randn_like(p) * 1e-3
        groups = encoder_arch('resnet34')[1]['split'](model)
        times = {}
        for name, make in (('fastai Adam', Adam), ('FusedAdam', FusedAdam)):
            opt = make(groups, lr=2e-3)
            for p in norm_bias_params(model, True): opt.state[p]['do_wd'] = False  # what Learner.create_opt does
            times[name] = seconds_per_step(opt, a.steps)
        held = str(layout).replace('torch.', '')
        print(f"{held}: fastai Adam {times['fastai Adam']:.3f} s, FusedAdam {times['FusedAdam']:.3f} s per step: "
              f"{times['fastai Adam'] / times['FusedAdam']:.1f}x  [{cpu_summary()}]", flush=True)


if __name__ == '__main__': main()
