"""Hostile input (issue 16): what a demanding user gives the command line when they try to break it. Every case
runs `liver-seg` as a real subprocess and checks, besides the outcome, that no input changed (a checksum of every
file given to the command) and that nothing was half-written.

- a refusal: exit status 2, exactly one line on stderr that names the file and matches the problem, no traceback,
  and never a hint to use `--force` when the output is an input;
- an acceptable input (a non-image DICOM object beside a series, a chosen series, a user's file beside an export):
  exit status 0 and the right output;
- a header that claims 1200^3 voxels in 99 bytes: refused while the child's peak resident memory (`os.wait4`'s
  `ru_maxrss`, the child alone) stays far below what the claim would take.

The shared machinery (phantom data, tiny model folders, `refusal_problems`) is `tests/test_bad_input.py`'s."""
import gzip, json, os, re, shutil, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_input import (CMD, TIMEOUT, JOBS, selected_cases, SHAPE, FAST, Data, refusal_problems, visible_lines, snapshot, save_nii,
                            slice_folder, dcm_testfile)

PEAK_LIMIT = 1.5 * 2**30  # bytes: the bomb claims 3.2 GB; torch and fastai alone stay well under this


# The child is started by a small Python process: Linux counts, in a child's peak RSS, the memory of the process it
# was forked from (the whole pytest process, GBs late in a full run), so `liver-seg` must be forked from something small.
_SPAWN = ("import json, os, sys\n"
          "pid = os.fork()\n"
          "if pid == 0: os.execvp(sys.argv[2], sys.argv[2:])\n"
          "_, status, usage = os.wait4(pid, 0)\n"
          "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))")


def run(args, cwd=None):
    "Run `liver-seg ARGS`: (CompletedProcess with str stdout/stderr, peak RSS of `liver-seg` alone, in bytes)"
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile('r') as st:
        subprocess.run([sys.executable, '-c', _SPAWN, st.name, *CMD, *[str(a) for a in args]], stdout=out, stderr=err,
                       stdin=subprocess.DEVNULL, env=env, cwd=cwd, timeout=TIMEOUT)
        code, maxrss = json.loads(open(st.name).read())
        out.seek(0); err.seek(0)
        res = subprocess.CompletedProcess(CMD + list(args), code, out.read().decode('utf-8', 'replace'),
                                          err.read().decode('utf-8', 'replace'))
    return res, maxrss * 1024


@dataclass
class Spec:
    args: list                      # arguments of `liver-seg`
    names: list                     # the stderr line must name one of these (a refusal)
    problem: str                    # regex the stderr line must match (a refusal), or of the one stderr note (accepted)
    out: object = None              # output: must not exist afterwards (refusal) / must exist (accepted)
    before: object = None           # snapshot of an existing output that must stay as it is
    inputs: dict = field(default_factory=dict)  # {path: snapshot} of every input, taken before the run
    ok: bool = False                # an acceptable input: exit 0, `out` written
    note: bool = False              # accepted with one stderr line matching `problem`
    check: object = None            # extra check f(res) -> list of problems
    cwd: object = None
    peak: bool = False              # the child's peak RSS must stay under PEAK_LIMIT
    skip: str|None = None


CASES = {}

def case(cid):
    def deco(f):
        assert cid not in CASES, cid
        CASES[cid] = f
        return f
    return deco


def S(args, names, problem, out=None, inputs=(), **kw):
    names = [names] if isinstance(names, (str, Path)) else list(names)
    if out is not None and any(Path(out).resolve() == Path(p).resolve() for p in inputs): out = None  # checked as an input
    return Spec([str(a) for a in args], [str(n) for n in names], problem, out,
                inputs={str(p): snapshot(p) for p in inputs}, **kw)


def P(d, model, inp, out, names, problem, inputs=(), extra=(), **kw):
    "A `predict` case on model folder `model` (a name of `Data.models`, or a folder)"
    return S(['predict', d.model(model) if isinstance(model, str) else model, inp, out, '--device', 'cpu', '-q', *extra], names, problem, out,
             [*inputs, inp], skip=d.models_skip, **kw)


# ------------------------------------------------------------------ inputs

def fake_series(folder, zs, names=None, **attrs):
    "CT_small.dcm (a real 128x128 CT slice) at positions z in `zs`, with DICOM attributes `attrs` (None deletes)"
    import pydicom
    src = dcm_testfile('CT_small.dcm')
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    for n, z in enumerate(zs):
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [-158.135803, -179.035797, float(z)]
        ds.InstanceNumber = n + 1
        for k, v in attrs.items():
            if v is None: delattr(ds, k)
            else: setattr(ds, k, v)
        ds.save_as(folder/(names[n] if names else f'IM{n:04d}'))
    return folder


def encapsulated_pdf(path):
    "A DICOM encapsulated PDF (modality DOC), as PACS exports put reports beside the images"
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid, ExplicitVRLittleEndian
    meta = FileMetaDataset(); meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.104.1'
    meta.MediaStorageSOPInstanceUID = generate_uid(); meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 'DOC'
    ds.MIMETypeOfEncapsulatedDocument, ds.EncapsulatedDocument = 'application/pdf', b'%PDF-1.4 a report'
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def bomb(path, shape=(1200, 1200, 1200)):
    "A .nii.gz of about 100 bytes whose header claims `shape` int16 voxels (3.2 GB for 1200^3)"
    h = nib.Nifti1Header(); h.set_data_shape(shape); h.set_data_dtype(np.int16); h.set_qform(np.eye(4), 1)
    h['vox_offset'] = 352
    Path(path).write_bytes(gzip.compress(h.binaryblock + b'\0' * 4))
    return Path(path)


def zero_slice_spacing(d, path):
    "The phantom as a qform-only .nii whose stored slice spacing (pixdim[3]) is 0"
    img = nib.Nifti1Image(d.hu, d.aff); img.set_sform(None, 0); img.set_qform(d.aff, 1)
    nib.save(img, str(path))
    with open(path, 'rb') as f: raw = nib.Nifti1Header.from_fileobj(f, check=False)
    pix = raw['pixdim'].copy(); pix[3] = 0; raw['pixdim'] = pix
    b = bytearray(Path(path).read_bytes()); b[:348] = raw.binaryblock; Path(path).write_bytes(bytes(b))
    return Path(path)


def with_config(d, t, **change):
    "A copy of the 'hu_windows' model folder with config.json values changed"
    m = t/'model'; shutil.copytree(d.model('hu_windows'), m)
    cfg = json.loads((m/'config.json').read_text()); cfg.update(change)
    (m/'config.json').write_text(json.dumps(cfg))
    return m


def no_force_hint(res):
    return ["the refusal suggests --force, which would not help"] if '--force' in res.stderr else []


INPUT = r'is an input|holds an input'

# ================================================================== 1. no command writes over an input

@case('predict-output-is-the-input')
def _(t, d):
    ct = shutil.copy(d.volume, t/'ct.nii.gz')
    return P(d, 'hu_windows', ct, ct, 'ct.nii.gz', INPUT, extra=['--force'], check=no_force_hint)

@case('predict-output-is-the-input-via-dotdot')
def _(t, d):
    ct = shutil.copy(d.volume, t/'ct.nii.gz'); (t/'sub').mkdir()
    return P(d, 'hu_windows', ct, t/'sub'/'..'/'ct.nii.gz', 'ct.nii.gz', INPUT, extra=['--force'], check=no_force_hint)

@case('predict-output-is-a-symlink-to-the-input')
def _(t, d):
    ct = shutil.copy(d.volume, t/'ct.nii.gz'); (t/'link.nii.gz').symlink_to(ct)
    spec = P(d, 'hu_windows', ct, t/'link.nii.gz', 'link.nii.gz', INPUT, extra=['--force'], check=no_force_hint)
    spec.out = None  # the link exists before and after; the CT it points to must be unchanged (inputs)
    return spec

@case('predict-output-is-the-input-spelled-relative')
def _(t, d):
    ct = Path(shutil.copy(d.volume, t/'ct.nii.gz'))
    spec = P(d, 'hu_windows', ct, 'ct.nii.gz', 'ct.nii.gz', INPUT, extra=['--force'], check=no_force_hint, cwd=t)
    spec.out = None
    return spec

@case('predict-output-is-the-input-without-force')
def _(t, d):
    ct = shutil.copy(d.volume, t/'ct.nii.gz')
    return P(d, 'hu_windows', ct, ct, 'ct.nii.gz', INPUT, check=no_force_hint)

@case('predict-folder-of-volumes-into-itself')
def _(t, d):
    vols = t/'vols'; vols.mkdir()
    for n in (1, 2): shutil.copy(d.volume, vols/f'ct{n}.nii.gz')
    spec = P(d, 'hu_windows', vols, vols, ['ct1.nii.gz', 'ct2.nii.gz'], INPUT, extra=['--force'], check=no_force_hint)
    spec.out = None
    return spec

@case('predict-slice-folder-into-itself')
def _(t, d):
    data = slice_folder(t/'data')
    spec = P(d, 'image', data, data, data, INPUT, extra=['--force'], check=no_force_hint)
    spec.out = None
    return spec

@case('evaluate-csv-onto-the-ground-truth')
def _(t, d):
    gt = shutil.copy(d.seg, t/'segmentation-0.nii.gz'); pred = shutil.copy(d.seg, t/'pred-0.nii.gz')
    return S(['evaluate', pred, gt, '--csv', gt, '--force'], 'segmentation-0.nii.gz', INPUT, None, [gt, pred], check=no_force_hint)

@case('prepare-chaos-case-into-itself')
def _(t, d):
    c = t/'case'; shutil.copytree(d.chaos[0], c)
    return S(['prepare', c, c, '--force', '-q'], c/'masks', INPUT, None, [c], check=no_force_hint)


# ================================================================== 2. prepare --force removes only what an export wrote

@case('prepare-force-into-a-folder-that-never-held-an-export')
def _(t, d):
    out = t/'out'; (out/'images').mkdir(parents=True); (out/'masks').mkdir()
    (out/'images'/'notes').write_text('mine'); (out/'masks'/'mine.png').write_bytes(b'mine')
    return S(['prepare', d.good, out, '--force', '-q'], out, r'did not write', None, [out, d.good])

@case('prepare-force-keeps-a-users-file-beside-an-export')
def _(t, d):
    from liver_seg.prepare import prepare
    out = t/'out'; prepare(d.good, out, progress=False)
    (out/'images'/'notes.txt').write_text('mine')
    def kept(res):
        bad = [] if (out/'images'/'notes.txt').read_text() == 'mine' else ["the user's images/notes.txt was changed or removed"]
        return bad + ([] if (out/'manifest.csv').exists() else ["no manifest.csv"])
    return S(['prepare', d.good, out, '--force', '-q'], [], '', None, [d.good], ok=True, check=kept)


# ================================================================== 3. DICOM geometry is never guessed

@case('predict-dicom-irregular-slice-spacing')
def _(t, d):
    s = fake_series(t/'irregular', zs=[0, 2, 4, 6, 8.9, 11.8, 14.7])
    return P(d, 'hu_windows', s, t/'pred.nii.gz', s, r'irregular slice spacing.*2\.00.*2\.90')

@case('predict-dicom-interleaved-series-without-uid')
def _(t, d):
    s = fake_series(t/'mixed', zs=[0, 5, 10, 15], SeriesNumber=1, SeriesInstanceUID=None)
    fake_series(s, zs=[2.5, 7.5, 12.5], names=['B1', 'B2', 'B3'], SeriesNumber=2, SeriesInstanceUID=None)
    return P(d, 'hu_windows', s, t/'pred.nii.gz', s, r'2 series without SeriesInstanceUID')


# ================================================================== 4. memory on a header's word

@case('predict-header-bomb')
def _(t, d):
    b = bomb(t/'ct.nii.gz')
    return P(d, 'hu_windows', b, t/'pred.nii.gz', 'ct.nii.gz', r'declares 1200x1200x1200', peak=True)

@case('evaluate-header-bomb')
def _(t, d):
    b = bomb(t/'pred-0.nii.gz')
    return S(['evaluate', b, d.seg, '--csv', t/'m.csv'], 'pred-0.nii.gz', r'declares 1200x1200x1200', t/'m.csv', [b, d.seg], peak=True)

@case('prepare-header-bomb')
def _(t, d):
    src = t/'src'; src.mkdir(); bomb(src/'volume-0.nii.gz'); shutil.copy(d.seg, src/'segmentation-0.nii.gz')
    return S(['prepare', src, t/'out', '-q'], 'volume-0.nii.gz', r'declares 1200x1200x1200', t/'out', [src], peak=True)


# ================================================================== 5. one line, not a traceback

@case('predict-rgb-nifti')
def _(t, d):
    rgb = np.zeros(SHAPE, dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    p = save_nii(rgb, t/'rgb.nii.gz', d.aff)
    return P(d, 'hu_windows', p, t/'pred.nii.gz', 'rgb.nii.gz', r'RGB')

@case('evaluate-rgb-nifti')
def _(t, d):
    p = save_nii(np.zeros(SHAPE, dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')]), t/'pred-0.nii.gz', d.aff)
    return S(['evaluate', p, d.seg], 'pred-0.nii.gz', r'RGB', None, [p, d.seg])

@case('predict-zero-slice-spacing')
def _(t, d):
    p = zero_slice_spacing(d, t/'flat.nii')
    return P(d, 'hu_windows', p, t/'pred.nii.gz', 'flat.nii', r'spacing.*0\.0')

@case('predict-output-is-an-existing-folder-with-force')
def _(t, d):
    out = t/'pred.nii.gz'; out.mkdir(); (out/'keep').write_text('mine')
    return P(d, 'hu_windows', d.volume, out, 'pred.nii.gz', r'is a folder', extra=['--force'], before=snapshot(out))

@case('evaluate-csv-is-an-existing-folder-with-force')
def _(t, d):
    out = t/'m.csv'; out.mkdir()
    return S(['evaluate', d.seg, d.seg, '--csv', out, '--force'], 'm.csv', r'is a folder', out, [d.seg], before=snapshot(out))

for _v in (100000, 0, 'big'):
    @case(f'predict-config-size-{_v}')
    def _(t, d, v=_v):
        if d.models_skip: return S([], [], '', skip=d.models_skip)
        m = with_config(d, t, size=v)
        return P(d, m, d.volume, t/'pred.nii.gz', 'config.json', rf"'size' is {re.escape(json.dumps(v))}", inputs=[m])

@case('predict-config-input-kind-unknown')
def _(t, d):
    if d.models_skip: return S([], [], '', skip=d.models_skip)
    m = with_config(d, t, input={'kind': 'hu', 'windows': [[150, 30], [200, 60]]})
    return P(d, m, d.volume, t/'pred.nii.gz', 'config.json', r"'input\.kind' is", inputs=[m])


# ================================================================== 6. non-image DICOM objects are skipped, and said so

@case('predict-dicom-with-pdf-seg-sr-ecg-beside-it')
def _(t, d):
    s = fake_series(t/'exam', zs=[0, 5, 10, 15])
    encapsulated_pdf(s/'REPORT')
    for name in ('liver_1frame.dcm', 'test-SR.dcm', 'waveform_ecg.dcm'): shutil.copy(dcm_testfile(name), s/name)
    return P(d, 'hu_windows', s, t/'pred.nii.gz', [], r'skipped 4 non-image DICOM objects: REPORT \(DOC\)', ok=True, note=True)


# ================================================================== 7. train on an export that never finished

def _unfinished(t, d, drop_manifest=True):
    from liver_seg.prepare import prepare
    data = t/'data'; prepare(d.good, data, fmt='png', progress=False)
    if drop_manifest: (data/'manifest.csv').unlink()
    for p in sorted((data/'images').iterdir())[3:5]: p.unlink()
    return data

@case('train-on-a-prepare-output-without-manifest')
def _(t, d):
    data = _unfinished(t, d)
    return S(['train', data, '--out', t/'model', *FAST, '-q'], data, r'liver-seg prepare',
             t/'model', [data])

@case('train-on-a-prepare-output-with-files-missing')
def _(t, d):
    data = _unfinished(t, d, drop_manifest=False)
    return S(['train', data, '--out', t/'model', *FAST, '-q'], 'volume-0_0003.png', r'missing.*liver-seg prepare', t/'model', [data])


@case('train-out-is-its-own-data-with-force')
def _(t, d):
    data = slice_folder(t/'slices')
    return S(['train', data, '--out', data, '--force', *FAST, '-q'], data, r'is an input of this command', None, [data],
             check=lambda res: [] if 'use --force' not in res.stderr else ['the refusal suggests --force'])

# ================================================================== 8. smaller ones

@case('predict-uint8-nifti-with-a-hu-model')
def _(t, d):
    p = save_nii((d.hu > 30).astype(np.uint8) * 200, t/'eight_bit.nii.gz', d.aff)
    return P(d, 'hu_windows', p, t/'pred.nii.gz', 'eight_bit.nii.gz', r'8-bit.*not HU')

@case('predict-missing-output-folder-found-before-the-model-is-loaded')
def _(t, d):
    # a model whose weights cannot be read: the old code loaded it first, so it said so instead
    return P(d, 'truncated-weights', d.volume, t/'nowhere'/'pred.nii.gz', t/'nowhere', r'output folder does not exist')

def _exam(t):
    s = fake_series(t/'exam', zs=[0, 5, 10, 15], SeriesDescription='ABDOMEN 5mm')
    fake_series(s, zs=[0, 1], names=['LOC1', 'LOC2'], SeriesInstanceUID='1.2.826.0.1.9', SeriesDescription='Localizer',
                ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    return s

@case('predict-dicom-localizer-and-axial-series')
def _(t, d):
    s = _exam(t)
    return P(d, 'hu_windows', s, t/'pred.nii.gz', s, r"2 series found: 1\.2\.826\.0\.1\.9 CT 'Localizer' \(2 slices\); .* CT 'ABDOMEN 5mm' \(4 slices\); choose one with --series UID")

@case('predict-dicom-series-chosen')
def _(t, d):
    import pydicom
    s = _exam(t)
    uid = pydicom.dcmread(dcm_testfile('CT_small.dcm')).SeriesInstanceUID
    def four_slices(res):
        out = t/'pred.nii.gz'
        return [] if out.exists() and nib.load(out).shape == (128, 128, 4) else ["the prediction is not the 4-slice axial series"]
    return P(d, 'hu_windows', s, t/'pred.nii.gz', [], '', extra=['--series', uid], ok=True, check=four_slices)


# ================================================================== running the table

def problems(spec, res, peak) -> list:
    if spec.ok:
        lines = visible_lines(res.stderr)
        bad = [] if res.returncode == 0 else [f"exit status {res.returncode}, expected 0"]
        if 'Traceback' in res.stderr: bad.append("traceback on stderr")
        if spec.note and (len(lines) != 1 or not re.search(spec.problem, lines[0])):
            bad.append(f"expected one stderr line matching /{spec.problem}/, got {lines}")
        if spec.out is not None and not Path(spec.out).exists(): bad.append(f"{spec.out} was not written")
    else: bad = refusal_problems(res, spec.names, spec.problem, spec.out, spec.before)
    for p, snap in spec.inputs.items():
        if snapshot(p) != snap: bad.append(f"input {p} was changed")
    if spec.check is not None: bad += spec.check(res)
    if spec.peak and peak > PEAK_LIMIT: bad.append(f"peak RSS {peak/2**30:.2f} GB, over {PEAK_LIMIT/2**30:.1f} GB")
    return bad


@pytest.fixture(scope='module')
def results(request, tmp_path_factory):
    "{case id: (Spec, (CompletedProcess, peak RSS) or None)} for the selected cases, run JOBS at a time"
    data = Data(tmp_path_factory.mktemp('shared'))
    specs = {cid: CASES[cid](tmp_path_factory.mktemp(cid[:40]), data) for cid in selected_cases(request)}
    todo = [c for c, s in specs.items() if s.skip is None]
    bombs = [c for c in todo if specs[c].peak]  # one at a time: a failing one may take GBs
    rest = [c for c in todo if not specs[c].peak]
    with ThreadPoolExecutor(max(1, JOBS)) as pool:
        done = dict(zip(rest, pool.map(lambda c: run(specs[c].args, specs[c].cwd), rest)))
    done |= {c: run(specs[c].args, specs[c].cwd) for c in bombs}
    return {c: (s, done.get(c)) for c, s in specs.items()}


@pytest.mark.parametrize('cid', list(CASES))
def test_hostile_input(cid, results):
    spec, got = results[cid]
    if spec.skip: pytest.skip(spec.skip)
    res, peak = got
    bad = problems(spec, res, peak)
    assert not bad, ("; ".join(bad) + f"\n$ liver-seg {' '.join(spec.args)}\nexit {res.returncode}, peak {peak/2**20:.0f} MB\n"
                     f"--- stderr ---\n{res.stderr[-3000:]}\n--- stdout ---\n{res.stdout[-800:]}")
