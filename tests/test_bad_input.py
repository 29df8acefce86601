"""Bad input to every `liver-seg` command ends with one line on stderr that names the file and the problem,
exit status 2, no traceback, and nothing written: a new output does not exist afterwards, an existing one is
byte-for-byte unchanged (DESIGN.md, "Errors").

Every case runs the command line as a real subprocess of this interpreter. Cases are declared in a table
(`@case('command-problem')`), built on small synthetic phantoms (64 x 64 x 8), pydicom's bundled test files and
tiny `simple_cnn` model folders, and run a few at a time (each start of `liver-seg` imports numpy, and for
train/predict torch and fastai; the cases are independent). `LIVER_SEG_TEST_JOBS` sets how many run at once."""
import json, os, re, resource, shutil, signal, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

SHAPE = (64, 64, 8)
# The interpreter running the tests, so the subprocess sees the same (editable) install, independent of PATH and
# of `liver_seg/__main__.py`. With `python -c`, `sys.argv[1:]` is exactly the arguments given after the code.
CMD = [sys.executable, '-c', 'import sys; from liver_seg.cli import main; sys.exit(main())']
TIMEOUT = 300
JOBS = int(os.environ.get('LIVER_SEG_TEST_JOBS', 3))
IS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0


# ------------------------------------------------------------------ running and checking

def _limit_file_size(nbytes):
    "preexec_fn: writes past `nbytes` fail with EFBIG, like a full disk (for root too), instead of killing the process"
    def f():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return f


def run(args, max_file_size=None):
    "Run `liver-seg ARGS` in a subprocess and return the CompletedProcess (text)"
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    return decoded(subprocess.run(CMD + [str(a) for a in args], capture_output=True, timeout=TIMEOUT, env=env,
                                  stdin=subprocess.DEVNULL,
                                  preexec_fn=None if max_file_size is None else _limit_file_size(max_file_size)))


def decoded(res):
    "`res` with str stdout/stderr, keeping carriage returns (text=True would turn them into newlines)"
    res.stdout, res.stderr = (b.decode('utf-8', 'replace') for b in (res.stdout, res.stderr))
    return res


def snapshot(p):
    "Bytes of a file, {relative path: bytes, or None for a folder} of a folder, or None if `p` does not exist"
    p = Path(p)
    if p.is_file(): return p.read_bytes()
    if p.is_dir(): return {str(q.relative_to(p)): (q.read_bytes() if q.is_file() else None) for q in sorted(p.rglob('*'))}
    return None


def visible_lines(text) -> list:
    "The non-blank lines a terminal shows for `text`: of each line only what follows its last carriage return"
    return [l.split('\r')[-1] for l in text.split('\n') if l.split('\r')[-1].strip()]


def refusal_problems(res, names, problem, out=None, before=None) -> list:
    """What is wrong with `res` as a clean refusal (empty list: nothing). A progress bar that clears itself
    (`\\r` then blanks) is not a line; one left on the screen is."""
    err, bad = res.stderr, []
    lines = visible_lines(err)
    if 'Traceback' in err: bad.append("traceback on stderr")
    if res.returncode != 2: bad.append(f"exit status {res.returncode}, expected 2")
    if len(lines) != 1: bad.append(f"{len(lines)} lines on stderr, expected 1")
    last = lines[-1] if lines else ''
    if not any(str(n) in last for n in names): bad.append(f"the last stderr line names none of {[str(n) for n in names]}")
    if not re.search(problem, last, re.I): bad.append(f"the last stderr line does not match /{problem}/")
    if out is not None:
        out = Path(out)
        if before is None and out.exists():
            what = sorted(snapshot(out))[:6] if out.is_dir() else f"{out.stat().st_size} bytes"
            bad.append(f"output {out} was written ({what})")
        if before is not None and snapshot(out) != before: bad.append(f"existing output {out} was changed")
    return bad


# ------------------------------------------------------------------ the table of cases

@dataclass
class Spec:
    "One run of the command line and what its refusal must look like"
    args: list                       # arguments of `liver-seg`
    names: list                      # the stderr line must contain one of these (the file or folder at fault)
    problem: str                     # regex the stderr line must match (the problem), case-insensitive
    out: object = None               # output path: must not exist afterwards, or equal `before`
    before: object = None            # snapshot of an existing output
    max_file_size: int|None = None   # RLIMIT_FSIZE for the run (simulated full disk)
    skip: str|None = None            # reason to skip this case


CASES = {}

def case(cid):
    "Register a case builder `f(tmp, data) -> Spec` under the test id `cid`"
    def deco(f):
        assert cid not in CASES, cid
        CASES[cid] = f
        return f
    return deco


def S(args, names, problem, out=None, before=None, **kw):
    names = [names] if isinstance(names, (str, Path)) else list(names)
    return Spec([str(a) for a in args], [str(n) for n in names], problem, out, before, **kw)


# ------------------------------------------------------------------ data

def save_nii(arr, path, affine=None):
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    nib.save(img, str(path))
    return Path(path)


def write_png(path, arr):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return Path(path)


def slice_folder(root, n_cases=2, n_slices=3, size=32):
    "A valid slice folder: images/ + masks/ (gray PNG, 0/1/2 masks), cases '0', '1', ..."
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        for k in range(n_slices):
            m = np.zeros((size, size), np.uint8); m[8:20, 8:20] = 1; m[10:14, 10:14] = 2
            write_png(root/'images'/f'{c}_{k}.png', rng.integers(0, 255, (size, size)))
            write_png(root/'masks'/f'{c}_{k}.png', m)
    return Path(root)


def dcm_testfile(name):
    from pydicom.data import get_testdata_file
    f = get_testdata_file(name)
    if f is None: pytest.skip(f"pydicom test file {name} not available")
    return Path(f)


class Data:
    "Shared inputs, built once: a phantom, a valid LiTS folder, CHAOS cases, model folders"
    def __init__(self, root:Path):
        from liver_seg.synth import make_phantom, write_chaos_case
        self.root = root
        self.hu, self.lab, self.aff = make_phantom(SHAPE, seed=3, n_tumors=2)
        self.good = root/'good'; self.good.mkdir()
        save_nii(self.hu, self.good/'volume-0.nii.gz', self.aff); save_nii(self.lab, self.good/'segmentation-0.nii.gz', self.aff)
        self.volume, self.seg = self.good/'volume-0.nii.gz', self.good/'segmentation-0.nii.gz'
        self.chaos = [write_chaos_case(root/'chaos'/f'c{i}', shape=SHAPE, seed=20 + i) for i in (0, 1)]
        self.models, self.models_skip = {}, None
        try: self._models(root/'models')
        except Exception as e: self.models_skip = f"liver_seg.model not ready ({type(e).__name__}: {e})"

    def _models(self, root):
        "Tiny simple_cnn model folders: a valid 'hu_windows' and 'image' model, and broken ones"
        import torch
        from liver_seg.model import build_model, default_config, save_model_folder
        torch.manual_seed(0)
        root.mkdir()
        m = self.models
        for kind in ('hu_windows', 'image'):
            cfg = default_config(arch='simple_cnn', size=32, arch_kwargs={'width': 4},
                                 input={'kind': kind, 'windows': [[150, 30], [200, 60]], 'freqhist': True, 'context': 0})
            m[kind] = save_model_folder(build_model(cfg), cfg, root/kind)
        # a fastai U-Net (its import path differs from simple_cnn's: fastai is imported when it is built)
        cfg = default_config(arch='resnet18', size=32, input={'kind': 'image', 'context': 0})
        m['resnet18-image'] = save_model_folder(build_model(cfg), cfg, root/'resnet18-image')
        def variant(name, change):
            d = root/name; shutil.copytree(m['hu_windows'], d); change(d); m[name] = d
        variant('config-only', lambda d: (d/'weights.safetensors').unlink())
        def wider(d):  # weights of width 4, the config asks for width 8
            cfg = json.loads((d/'config.json').read_text()); cfg['arch_kwargs'] = {'width': 8}
            (d/'config.json').write_text(json.dumps(cfg))
        variant('mismatch', wider)
        variant('bad-json', lambda d: (d/'config.json').write_text('{"arch": "simple_cnn", '))
        variant('truncated-weights', lambda d: (d/'weights.safetensors').write_bytes((d/'weights.safetensors').read_bytes()[:200]))

    def model(self, name):
        return self.models.get(name, self.root/'no-model-built')

    # bad volumes: each writer puts a bad `volume-0` into `folder` and returns its path
    def bad_volume(self, kind, folder) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        p = folder/'volume-0.nii.gz'
        if kind == 'truncated-nii.gz': p.write_bytes(self.volume.read_bytes()[:300])
        elif kind == 'truncated-nii-data':  # header complete, voxel data cut in half
            p = folder/'volume-0.nii'; save_nii(self.hu, p, self.aff)
            b = p.read_bytes(); p.write_bytes(b[:352 + (len(b) - 352)//2])
        elif kind == '2d-nifti': save_nii(self.hu[:, :, 0], p, self.aff)
        elif kind == '4d-nifti': save_nii(np.stack([self.hu]*2, -1), p, self.aff)
        elif kind == 'nan-voxels':
            a = self.hu.astype(np.float32); a[10, 20, 3] = np.nan; a[11, 20, 3] = np.inf
            save_nii(a, p, self.aff)
        else: raise ValueError(kind)
        return p

    def bad_lits(self, kind, folder) -> tuple:
        "(LiTS folder with a bad volume-0 and a valid segmentation-0, the bad volume)"
        vol = self.bad_volume(kind, folder)
        shutil.copy(self.seg, folder/'segmentation-0.nii.gz')
        return folder, vol

    def bad_chaos(self, kind, folder) -> Path:
        "A copy of a CHAOS case whose DICOM/ holds a truncated file, an MR file, a second series, or a cut slice"
        shutil.copytree(self.chaos[0], folder)
        d = folder/'DICOM'
        if kind == 'truncated-dicom': shutil.copy(dcm_testfile('MR_truncated.dcm'), d/'zz_truncated.dcm')
        elif kind == 'not-ct-dicom': shutil.copy(dcm_testfile('MR_small.dcm'), d/'zz_mr.dcm')
        elif kind == 'two-series':
            for p in (self.chaos[1]/'DICOM').iterdir(): shutil.copy(p, d/f'other_{p.name}')
        elif kind == 'truncated-ct-slice':
            p = sorted(d.iterdir())[3]; p.write_bytes(p.read_bytes()[:-2000])
        else: raise ValueError(kind)
        return folder


BAD_VOLUMES = {'truncated-nii.gz': r'truncat|corrupt|not a readable', 'truncated-nii-data': r'truncat|corrupt',
               '2d-nifti': r'3D|shape', '4d-nifti': r'3D|shape', 'nan-voxels': r'nan|inf|finite'}
BAD_DICOM = {'truncated-dicom': r'truncat|corrupt|readable|modality', 'not-ct-dicom': r'modality|CT',
             'two-series': r'series', 'truncated-ct-slice': r'truncat|corrupt|pixel'}
FULL_DISK = 64        # bytes a run may write to one file in the failing-write cases
WROTE = r'writ|space|too large|disk'
UNDER_FILE = r'not a (folder|directory)|does not exist|exists|cannot'
SHAPE_RE = r'shape|\d+ ?x ?\d+|\(\d+, \d+\)'


# ================================================================== prepare SRC OUT

@case('prepare-missing-path')
def _(t, d): return S(['prepare', t/'nope', t/'out'], t/'nope', r'no such', t/'out')

@case('prepare-empty-folder')
def _(t, d):
    (t/'src').mkdir()
    return S(['prepare', t/'src', t/'out'], t/'src', r'no volumes|found', t/'out')

for _k in BAD_VOLUMES:
    @case(f'prepare-{_k}')
    def _(t, d, k=_k):
        folder, vol = d.bad_lits(k, t/'src')
        return S(['prepare', folder, t/'out'], vol.name, BAD_VOLUMES[k], t/'out')

@case('prepare-volume-segmentation-shape-mismatch')
def _(t, d):
    shutil.copy(d.volume, t/'volume-0.nii.gz'); save_nii(d.lab[:, :, :5], t/'segmentation-0.nii.gz', d.aff)
    return S(['prepare', t, t/'out'], ['segmentation-0', 'volume-0'], r'shape', t/'out')

@case('prepare-segmentation-unknown-labels')
def _(t, d):
    shutil.copy(d.volume, t/'volume-0.nii.gz')
    save_nii(np.where(d.lab > 0, 7, 0).astype(np.uint8), t/'segmentation-0.nii.gz', d.aff)
    return S(['prepare', t, t/'out'], 'segmentation-0', r'label|value', t/'out')

for _k in BAD_DICOM:
    @case(f'prepare-{_k}')
    def _(t, d, k=_k):
        c = d.bad_chaos(k, t/'case')
        return S(['prepare', c, t/'out'], c/'DICOM', BAD_DICOM[k], t/'out')

@case('prepare-unknown-mask-values')
def _(t, d):
    shutil.copytree(d.chaos[0], t/'case')
    m = sorted((t/'case'/'masks').iterdir())[2]
    write_png(m, np.where(np.asarray(Image.open(m)) > 0, 50, 0))
    return S(['prepare', t/'case', t/'out'], m.name, r'mask values|50', t/'out')

@case('prepare-mask-shape-mismatch')
def _(t, d):
    shutil.copytree(d.chaos[0], t/'case')
    m = sorted((t/'case'/'masks').iterdir())[1]
    write_png(m, np.zeros((SHAPE[1], SHAPE[0] - 4)))
    return S(['prepare', t/'case', t/'out'], m.name, SHAPE_RE, t/'out')

@case('prepare-output-exists')
def _(t, d):
    out = t/'out'; (out/'images').mkdir(parents=True)
    (out/'manifest.csv').write_text('case,slice,image,mask,liver_px,tumor_px\n')
    (out/'images'/'x.jpg').write_bytes(b'not really')
    return S(['prepare', d.good, out], out, r'exist|prepared|force', out, snapshot(out))

@case('prepare-output-under-a-file')
def _(t, d):
    (t/'file').write_text('x')
    return S(['prepare', d.good, t/'file'/'out'], t/'file', UNDER_FILE, t/'file'/'out')

@case('prepare-read-only-output-folder')
def _(t, d):
    ro = t/'ro'; ro.mkdir(); ro.chmod(0o555)
    return S(['prepare', d.good, ro/'out'], ro, r'writ|permission', ro/'out',
             skip="root ignores folder permissions (prepare-output-under-a-file covers it)" if IS_ROOT else None)

@case('prepare-failing-write')
def _(t, d): return S(['prepare', d.good, t/'out', '--format', 'png'], t/'out', WROTE, t/'out', max_file_size=FULL_DISK)


# ================================================================== train DATA --out MODEL_DIR

FAST = ['--arch', 'simple_cnn', '--no-pretrained', '--epochs', '1', '--size', '32', '--bs', '4',
        '--precision', 'fp32', '--valid-cases', '1']

@case('train-missing-path')
def _(t, d): return S(['train', t/'nope', '--out', t/'model', *FAST], t/'nope', r'no such', t/'model')

@case('train-empty-folder')
def _(t, d):
    (t/'data').mkdir()
    return S(['train', t/'data', '--out', t/'model', *FAST], t/'data', r'no slice|found|empty', t/'model')

@case('train-image-mask-shape-mismatch')
def _(t, d):
    data = slice_folder(t/'data')
    m = write_png(data/'masks'/'0_1.png', np.zeros((24, 32)))
    return S(['train', data, '--out', t/'model', *FAST], m.name, SHAPE_RE, t/'model')

@case('train-unknown-mask-values')
def _(t, d):
    data = slice_folder(t/'data')
    m = data/'masks'/'1_2.png'; write_png(m, np.where(np.asarray(Image.open(m)) > 0, 50, 0))
    return S(['train', data, '--out', t/'model', *FAST], [m.name, data], r'mask values|50', t/'model')

@case('train-output-exists')
def _(t, d):
    data = slice_folder(t/'data')
    out = t/'model'; out.mkdir(); (out/'config.json').write_text('{"arch": "mine"}')
    return S(['train', data, '--out', out, *FAST], out, r'exist|force', out, snapshot(out))

@case('train-output-under-a-file')
def _(t, d):
    data = slice_folder(t/'data'); (t/'file').write_text('x')
    return S(['train', data, '--out', t/'file'/'model', *FAST], t/'file', UNDER_FILE, t/'file'/'model')

@case('train-resume-nothing-to-resume')
def _(t, d):
    data = slice_folder(t/'data')
    return S(['train', data, '--out', t/'model', *FAST, '--resume'], t/'model', r'nothing to resume', t/'model')

@case('train-crop-larger-than-size')
def _(t, d):
    data = slice_folder(t/'data'); cfg = t/'crop.yaml'; cfg.write_text('crop: 64\n')  # --size 32 in FAST
    return S(['train', data, '--out', t/'model', *FAST, '--config', cfg], '--crop', r'patch side', t/'model')

@case('train-failing-write')
def _(t, d):
    data = slice_folder(t/'data')
    return S(['train', data, '--out', t/'model', *FAST], t/'model', WROTE, t/'model', max_file_size=FULL_DISK)


# ================================================================== predict MODEL_DIR INPUT OUTPUT

def P(d, model, inp, out, names, problem, before=None, **kw):
    return S(['predict', d.model(model), inp, out, '--device', 'cpu'], names, problem, out, before,
             skip=d.models_skip, **kw)

for _k, _p in {'missing': r'not found|no such|missing', 'config-only': r'weights|missing', 'mismatch': r'match|size|shape',
               'bad-json': r'json', 'truncated-weights': r'weights|read|truncat|corrupt'}.items():
    @case(f'predict-model-{_k}')
    def _(t, d, k=_k, p=_p):
        model = t/'no-model' if k == 'missing' else d.model(k)
        spec = P(d, k, d.volume, t/'pred.nii.gz', model, p)
        spec.args[1] = str(model)
        return spec

@case('predict-image-model-given-hu-volume')
def _(t, d): return P(d, 'image', d.volume, t/'pred.nii.gz', d.volume.name, r'8-bit|image|HU|Hounsfield')

@case('predict-resnet18-image-model-given-hu-volume')
def _(t, d): return P(d, 'resnet18-image', d.volume, t/'pred.nii.gz', d.volume.name, r'8-bit|image|HU|Hounsfield')

@case('predict-hu-model-given-gray-slices')
def _(t, d):
    data = slice_folder(t/'data')
    return P(d, 'hu_windows', data, t/'pred', [data], r'3-channel|gray|HU|window')

@case('predict-missing-path')
def _(t, d): return P(d, 'hu_windows', t/'nope.nii.gz', t/'pred.nii.gz', t/'nope.nii.gz', r'no such')

@case('predict-empty-folder')
def _(t, d):
    (t/'in').mkdir()
    return P(d, 'hu_windows', t/'in', t/'pred.nii.gz', t/'in', r'no |found|holds')

for _k in ('truncated-nii.gz', '4d-nifti', 'nan-voxels'):  # the other bad volumes: same reader, see evaluate-*
    @case(f'predict-{_k}')
    def _(t, d, k=_k):
        vol = d.bad_volume(k, t/'in')
        return P(d, 'hu_windows', vol, t/'pred.nii.gz', vol.name, BAD_VOLUMES[k])

for _k in BAD_DICOM:
    @case(f'predict-{_k}')
    def _(t, d, k=_k):
        c = d.bad_chaos(k, t/'case')
        return P(d, 'hu_windows', c/'DICOM', t/'pred.nii.gz', c/'DICOM', BAD_DICOM[k])

@case('predict-output-exists')
def _(t, d):
    out = t/'pred.nii.gz'; out.write_bytes(b'keep me')
    return P(d, 'hu_windows', d.volume, out, out, r'exist|force', b'keep me')

@case('predict-output-under-a-file')
def _(t, d):
    (t/'file').write_text('x')
    return P(d, 'hu_windows', d.volume, t/'file'/'pred.nii.gz', t/'file', UNDER_FILE)

@case('predict-read-only-output-folder')
def _(t, d):
    ro = t/'ro'; ro.mkdir(); ro.chmod(0o555)
    spec = P(d, 'hu_windows', d.volume, ro/'pred.nii.gz', ro, r'writ|permission')
    if IS_ROOT: spec.skip = "root ignores folder permissions (predict-output-under-a-file covers it)"
    return spec

@case('predict-failing-write')
def _(t, d): return P(d, 'hu_windows', d.volume, t/'pred.nii.gz', t/'pred.nii.gz', WROTE, max_file_size=FULL_DISK)


@case('predict-volumes-malformed-part')
def _(t, d):
    spec = P(d, 'hu_windows', d.good, t/'preds', '--part', r'i/n')
    spec.args += ['--part', '3']
    return spec

@case('predict-volumes-one-truncated')
def _(t, d):
    (t/'in').mkdir(); shutil.copy(d.volume, t/'in'/'volume-0.nii.gz')
    d.bad_volume('truncated-nii.gz', t/'in'/'v1').rename(t/'in'/'volume-1.nii.gz')
    return P(d, 'hu_windows', t/'in', t/'preds', 'volume-1.nii.gz', BAD_VOLUMES['truncated-nii.gz'])

@case('predict-volumes-output-exists')
def _(t, d):
    (t/'preds').mkdir(); (t/'preds'/'segmentation-0.nii.gz').write_bytes(b'keep me')
    return P(d, 'hu_windows', d.good, t/'preds', 'segmentation-0.nii.gz', r'exist|force', snapshot(t/'preds'))

@case('predict-workers-on-one-volume')
def _(t, d):
    spec = P(d, 'hu_windows', d.volume, t/'pred.nii.gz', d.volume, r'folder of volumes')
    spec.args += ['--workers', '2']
    return spec


# ================================================================== evaluate PRED GT [--csv FILE]

def E(pred, gt, csv, names, problem, before=None, **kw):
    return S(['evaluate', pred, gt, '--csv', csv], names, problem, csv, before, **kw)

@case('evaluate-missing-path')
def _(t, d): return E(t/'nope.nii.gz', d.seg, t/'m.csv', t/'nope.nii.gz', r'no such')

@case('evaluate-empty-folders')
def _(t, d):
    (t/'p').mkdir(); (t/'g').mkdir()
    return E(t/'p', t/'g', t/'m.csv', [t/'p', t/'g'], r'no ')

for _k in BAD_VOLUMES:
    @case(f'evaluate-{_k}')
    def _(t, d, k=_k):
        vol = d.bad_volume(k, t/'in')
        return E(vol, d.seg, t/'m.csv', vol.name, BAD_VOLUMES[k] + ('|integer' if k == 'nan-voxels' else ''))

@case('evaluate-shape-mismatch')
def _(t, d):
    p = save_nii(d.lab[:, :, :5], t/'pred-0.nii.gz', d.aff)
    return E(p, d.seg, t/'m.csv', ['pred-0', 'segmentation-0'], r'shape')

@case('evaluate-label-values-above-2')
def _(t, d):
    p = save_nii(np.where(d.lab > 0, 5, 0).astype(np.uint8), t/'pred-0.nii.gz', d.aff)
    return E(p, d.seg, t/'m.csv', 'pred-0', r'label|value')

@case('evaluate-unknown-mask-values')
def _(t, d):
    gt = slice_folder(t/'gt'); pred = t/'pred'; shutil.copytree(gt/'masks', pred)
    m = pred/'0_1.png'; write_png(m, np.where(np.asarray(Image.open(m)) > 0, 50, 0))
    return E(pred, gt, t/'m.csv', m.name, r'mask values|50')

@case('evaluate-masks-of-different-size')
def _(t, d):
    gt = slice_folder(t/'gt'); pred = t/'pred'
    for p in (gt/'masks').iterdir(): write_png(pred/p.name, np.asarray(Image.open(p))[:24])
    return E(pred, gt, t/'m.csv', [pred, gt], SHAPE_RE)

@case('evaluate-output-exists')
def _(t, d):
    csv = t/'m.csv'; csv.write_text('mine\n')
    return E(d.seg, d.seg, csv, csv, r'exist|force', b'mine\n')

@case('evaluate-output-under-a-file')
def _(t, d):
    (t/'file').write_text('x')
    return E(d.seg, d.seg, t/'file'/'m.csv', t/'file', UNDER_FILE)

@case('evaluate-read-only-output-folder')
def _(t, d):
    ro = t/'ro'; ro.mkdir(); ro.chmod(0o555)
    return E(d.seg, d.seg, ro/'m.csv', ro, r'writ|permission',
             skip="root ignores folder permissions (evaluate-output-under-a-file covers it)" if IS_ROOT else None)

@case('evaluate-failing-write')
def _(t, d): return E(d.seg, d.seg, t/'m.csv', t/'m.csv', WROTE, max_file_size=FULL_DISK)


# ================================================================== running the table

def selected_cases(request) -> list:
    "Case ids of this module's parametrized tests that the session selected (-k and all)"
    return [it.callspec.params['cid'] for it in request.session.items
            if it.path == request.path and 'cid' in getattr(getattr(it, 'callspec', None), 'params', {})]


@pytest.fixture(scope='module')
def results(request, tmp_path_factory):
    "{case id: (Spec, CompletedProcess or None)} for the cases selected in this session, run JOBS at a time"
    data = Data(tmp_path_factory.mktemp('shared'))
    specs = {}
    for cid in selected_cases(request):
        t = tmp_path_factory.mktemp(cid[:40])
        specs[cid] = CASES[cid](t, data)
    todo = [c for c, s in specs.items() if s.skip is None]
    with ThreadPoolExecutor(max(1, JOBS)) as pool:
        done = dict(zip(todo, pool.map(lambda c: run(specs[c].args, specs[c].max_file_size), todo)))
    for s in specs.values():  # make read-only folders removable again
        for a in s.args:
            if Path(a).parent.name == 'ro' and Path(a).parent.exists(): Path(a).parent.chmod(0o755)
    return {c: (s, done.get(c)) for c, s in specs.items()}


@pytest.mark.parametrize('cid', list(CASES))
def test_refused_cleanly(cid, results):
    spec, res = results[cid]
    if spec.skip: pytest.skip(spec.skip)
    bad = refusal_problems(res, spec.names, spec.problem, spec.out, spec.before)
    assert not bad, ("; ".join(bad) + f"\n$ liver-seg {' '.join(spec.args)}\nexit {res.returncode}\n"
                     f"--- stderr ---\n{res.stderr[-3000:]}\n--- stdout ---\n{res.stdout[-800:]}")


def test_usage_errors():
    "An unknown command and a missing argument are refused by the parser, without a traceback"
    res = run(['segment', 'x'])
    assert res.returncode == 2 and 'Traceback' not in res.stderr and 'segment' in res.stderr
    res = run(['predict', 'only-one-arg'])
    assert res.returncode == 2 and 'Traceback' not in res.stderr


def test_installed_liver_seg_executable_refuses_cleanly(tmp_path):
    "The console script of `pip install -e .` behaves like `liver_seg.cli.main`"
    exe = shutil.which('liver-seg')
    if exe is None: pytest.skip("`liver-seg` is not on PATH (package not installed with pip)")
    res = decoded(subprocess.run([exe, 'prepare', str(tmp_path/'nope'), str(tmp_path/'out')], capture_output=True,
                                 timeout=TIMEOUT, stdin=subprocess.DEVNULL))
    assert not refusal_problems(res, [tmp_path/'nope'], r'no such', tmp_path/'out'), res.stderr
