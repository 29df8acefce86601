"The CPU a number was measured on: its model and the flags that decide CPU inference and training speed"
import platform
from pathlib import Path

FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile', 'avx512_vnni', 'avx_vnni')

def cpu_summary() -> str:
    "e.g. 'AMD EPYC, 2 cores: avx2 avx512f avx512_bf16 avx512_vnni; no amx_bf16 amx_tile avx_vnni'"
    import os
    from liver_seg.config import cpu_flags  # the flags prediction and training decide by
    model, flags = platform.processor() or platform.machine(), cpu_flags() or set()
    info = Path('/proc/cpuinfo')
    if info.exists():
        model = next((v.strip() for k, _, v in (l.partition(':') for l in info.read_text().splitlines())
                      if k.strip() == 'model name' and v.strip()), model)
    have = [f for f in FLAGS if f in flags]
    lack = [f for f in FLAGS if f not in flags]
    cap = os.environ.get('ONEDNN_MAX_CPU_ISA') or os.environ.get('DNNL_MAX_CPU_ISA')
    return (f"{model}, {os.cpu_count()} cores: {' '.join(have) or 'none of ' + '/'.join(FLAGS)}" + (f"; no {' '.join(lack)}" if lack else '')
            + (f"; oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)" if cap else ''))

if __name__ == '__main__': print(cpu_summary())
