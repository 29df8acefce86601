"""Export speed: the seed's NIfTI -> JPG/PNG slice loop vs `liver_seg.prepare.prepare`, same volume, same run.

    python bench/export_speed.py [--slices 300] [--workers 1,2] [--big 1000] [--gz]

Writes a synthetic 512 x 512 x N int16 phantom (`volume-0.nii` + `segmentation-0.nii`, uncompressed like the LiTS
download; `--gz` for `.nii.gz`) to a temporary folder,
then runs, each in a fresh child process (reading included, interpreter start-up and imports excluded from "work"):

- the seed's way: `nib.load(...).get_fdata()` + `np.rot90` for volume and segmentation, then per slice
  `tensor(slice.astype(np.float32)).save_jpg(path, [liver, custom], quality=120)` (fastai.medical.imaging; the
  slice is made contiguous first, which fastai 2.8's `freqhist_bins` needs: its `view(-1)` fails on the rot90 view) and
  `Image.fromarray(mask.astype('uint8'), mode='L').save(png)`, every slice;
- ours: `prepare(src, out, fmt='jpg', every=1, windows=('liver', 'custom'), workers=W)` for each W in `--workers`.

It prints both times, slices/s, the ratio, peak RSS (VmHWM: ru_maxrss would include the bench's own memory at the
fork before exec), and checks that the JPEG files of a few slices are the same
(bytes, and decoded pixels) and the masks equal. `--big N` also measures the peak RSS of `prepare` on a
512 x 512 x N volume (the parent's and the largest worker's), the memory target of the design.
"""
import argparse, json, os, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))

SEED = r'''
import json, resource, sys, time
from pathlib import Path
t_imp = time.perf_counter()
import numpy as np, nibabel as nib
from PIL import Image
from fastai.basics import *
from fastai.vision.all import *
from fastai.medical.imaging import *
torch.set_num_threads(1)
src, out = Path(sys.argv[1]), Path(sys.argv[2])

def read_nii(filepath):
    ct_scan = nib.load(filepath)
    array = ct_scan.get_fdata()
    array = np.rot90(np.array(array))
    return array

t0, c0 = time.perf_counter(), time.process_time()
(out/'images').mkdir(parents=True); (out/'masks').mkdir(parents=True)
curr_ct = read_nii(next(src.glob('volume-0.nii*')))
curr_mask = read_nii(next(src.glob('segmentation-0.nii*')))
for curr_slice in range(curr_ct.shape[2]):
    data = tensor(np.ascontiguousarray(curr_ct[..., curr_slice]).astype(np.float32))
    mask = Image.fromarray(curr_mask[..., curr_slice].astype('uint8'), mode="L")
    data.save_jpg(out/'images'/f"volume-0_slice_{curr_slice}.jpg", [dicom_windows.liver, (200, 60)], quality=120)
    mask.save(out/'masks'/f"volume-0_slice_{curr_slice}_mask.png")
t1 = time.perf_counter()
print(json.dumps(dict(work=t1 - t0, cpu=time.process_time() - c0, imports=t0 - t_imp, slices=curr_ct.shape[2],
                      rss_mb=int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)))
'''

OURS = r'''
import json, os, resource, sys, threading, time
t_imp = time.perf_counter()
from liver_seg.prepare import prepare
src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
peaks, stop = {}, threading.Event()

def descendants():
    kids = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try: kids.setdefault(int(open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError): pass
    todo, res = [os.getpid()], []
    while todo:
        p = todo.pop(); res.append(p); todo += kids.get(p, [])
    return res[1:]

cpus, tick = {}, os.sysconf('SC_CLK_TCK')

def watch():  # peak RSS (VmHWM) and CPU time of the forkserver and workers, which are not our waited-for children
    known, scans = [], 0
    while not stop.is_set():
        if len(known) < workers + 1 or scans % 10 == 0: known = descendants()  # a /proc scan costs CPU: rarely
        scans += 1
        for p in known:
            try:
                for line in open(f'/proc/{p}/status'):
                    if line.startswith('VmHWM'): peaks[p] = max(peaks.get(p, 0), int(line.split()[1]) / 1024)
                f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
                cpus[p] = (int(f[11]) + int(f[12])) / tick
            except (OSError, IndexError, ValueError): pass
        stop.wait(0.05)

th = threading.Thread(target=watch, daemon=True); th.start()
t0, c0 = time.perf_counter(), time.process_time()
m = prepare(src, out, fmt='jpg', every=1, windows=('liver', 'custom'), workers=workers, progress=False)  # the seed's channels
t1, c1 = time.perf_counter(), time.process_time()
stop.set(); th.join()
import pandas as pd
print(json.dumps(dict(work=t1 - t0, cpu=c1 - c0 + sum(cpus.values()), imports=t0 - t_imp, slices=len(pd.read_csv(m)),
                      rss_mb=int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024,
                      workers_rss_mb=max(peaks.values(), default=0), all_rss_mb=sum(peaks.values()))))
'''


def run(code, *args):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', code, *map(str, args)], env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode: sys.exit(f"child failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1]); res['wall'] = wall
    return res


def make_volume(folder, n_slices, gz=False, seed=0):
    sys.path.insert(0, str(ROOT))
    from liver_seg.synth import write_lits_case
    t0 = time.perf_counter()
    v, _ = write_lits_case(folder, 0, compress=gz, shape=(512, 512, n_slices), spacing=(0.75, 0.75, 2.0), seed=seed)
    return time.perf_counter() - t0, v


def make_big_volume(folder, n_slices, gz=False):
    "A 512 x 512 x n int16 volume quickly: a 40-slice phantom repeated along z"
    sys.path.insert(0, str(ROOT))
    from liver_seg.synth import make_phantom, _save_nifti
    hu, lab, aff = make_phantom((512, 512, 40), seed=1)
    reps = -(-n_slices // 40)
    ext = '.nii.gz' if gz else '.nii'
    _save_nifti(np.tile(hu, (1, 1, reps))[:, :, :n_slices], aff, Path(folder)/f'volume-0{ext}')
    _save_nifti(np.tile(lab, (1, 1, reps))[:, :, :n_slices], aff, Path(folder)/f'segmentation-0{ext}')


def compare(seed_out, our_out, ks):
    from PIL import Image
    same_bytes, max_diff, masks_equal = 0, 0, True
    for k in ks:
        a, b = seed_out/'images'/f'volume-0_slice_{k}.jpg', our_out/'images'/f'volume-0_{k:04d}.jpg'
        same_bytes += a.read_bytes() == b.read_bytes()
        max_diff = max(max_diff, int(np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max()))
        masks_equal &= np.array_equal(np.asarray(Image.open(seed_out/'masks'/f'volume-0_slice_{k}_mask.png')),
                                      np.asarray(Image.open(our_out/'masks'/f'volume-0_{k:04d}.png')))
    return same_bytes, max_diff, masks_equal


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--slices', type=int, default=300)
    ap.add_argument('--workers', type=lambda v: [int(x) for x in v.split(',')], default=[1, 2],
                    help='comma-separated worker counts to run prepare with (default 1,2)')
    ap.add_argument('--big', type=int, default=0, help='also measure peak RSS of prepare on 512 x 512 x BIG')
    ap.add_argument('--skip-seed', action='store_true')
    ap.add_argument('--gz', action='store_true', help='write .nii.gz instead of .nii')
    a = ap.parse_args()
    print(f"CPU: {cpu_summary()}")
    print(f"CPUs: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, workers for prepare: {a.workers}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); src = d/'src'
        t, v = make_volume(src, a.slices, a.gz)
        print(f"phantom 512x512x{a.slices} int16 written in {t:.1f} s: {v.name}, {v.stat().st_size/2**20:.0f} MB")
        runs = []
        for w in a.workers:
            r = run(OURS, src, d/f'ours{w}', w); r['workers'] = w; runs.append(r)
            print(f"ours  : workers={w}: {r['work']:.2f} s work ({r['slices']/r['work']:.0f} slices/s, "
                  f"{r['work']/r['slices']*100:.2f} s per 100 slices, CPU {r['cpu']/r['slices']*1000:.1f} ms/slice), "
                  f"{r['wall']:.2f} s process, peak RSS {r['rss_mb']:.0f} MB (largest worker {r['workers_rss_mb']:.0f} MB, "
                  f"sum of all {r['rss_mb'] + r['all_rss_mb']:.0f} MB)")
        ours = min(runs, key=lambda r: r['work'])
        if not a.skip_seed:
            seed = run(SEED, src, d/'seed')
            print(f"seed  : {seed['work']:.2f} s work ({seed['slices']/seed['work']:.1f} slices/s, "
                  f"{seed['work']/seed['slices']*100:.2f} s per 100 slices, CPU {seed['cpu']/seed['slices']*1000:.1f} ms/slice), "
                  f"{seed['wall']:.2f} s process, peak RSS {seed['rss_mb']:.0f} MB")
            print(f"ratio : {seed['work']/ours['work']:.1f}x faster (work, ours with workers={ours['workers']}), "
                  f"{seed['wall']/ours['wall']:.1f}x (whole process), "
                  f"{seed['cpu']/ours['cpu']:.1f}x less CPU time  [{cpu_summary()}]")
            ks = [0, a.slices//3, a.slices//2, a.slices - 1]
            same, diff, masks = compare(d/'seed', d/f"ours{ours['workers']}", ks)
            print(f"pixels: {same}/{len(ks)} JPEG files byte-identical, max decoded difference {diff} grey levels, "
                  f"masks equal: {masks}")
        if a.big:
            big = d/'big'; big.mkdir()
            make_big_volume(big, a.big, a.gz)
            r = run(OURS, big, d/'big_out', max(a.workers))
            print(f"big   : 512x512x{a.big}, workers={max(a.workers)}: {r['work']:.1f} s, {r['slices']/r['work']:.0f} slices/s, peak RSS parent "
                  f"{r['rss_mb']:.0f} MB, largest worker {r['workers_rss_mb']:.0f} MB, sum of all processes' peaks "
                  f"{r['rss_mb'] + r['all_rss_mb']:.0f} MB")


if __name__ == '__main__': main()
