"The CPU a number was measured on: its model and the flags that decide CPU inference and training speed"
import platform
from pathlib import Path

FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile', 'avx512_vnni', 'avx_vnni')

def cpu_summary() -> str:
    "e.g. 'AMD EPYC, 2 cores: avx2 avx512f avx512_bf16 avx512_vnni; no amx_bf16 amx_tile avx_vnni'"
    import os
    model, flags = platform.processor() or platform.machine(), set()
    info = Path('/proc/cpuinfo')
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, val = line.partition(':')
            if key.strip() == 'model name' and val.strip(): model = val.strip()
            if key.strip() == 'flags': flags = set(val.split())
    have = [f for f in FLAGS if f in flags]
    lack = [f for f in FLAGS if f not in flags]
    cap = os.environ.get('ONEDNN_MAX_CPU_ISA') or os.environ.get('DNNL_MAX_CPU_ISA')
    return (f"{model}, {os.cpu_count()} cores: {' '.join(have) or 'none of ' + '/'.join(FLAGS)}" + (f"; no {' '.join(lack)}" if lack else '')
            + (f"; oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)" if cap else ''))

if __name__ == '__main__': print(cpu_summary())
