"Reading real CT files (NIfTI, DICOM, slice folders) with liver_seg.io, and writing labels back."
import gzip, os, re, shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from liver_seg.io import (LiverSegError, atomic_path, decode_mask, find_dicom_files, find_slice_pairs,
                          read_dicom_series, read_image, read_labels, read_mask, read_nifti, read_slice_volume,
                          write_labels)

DATA = (Path(__file__).parents[1]/'..'/'shared'/'data').resolve()
REAL = DATA/'real-ct-io'
TSEG = REAL/'totalsegmentator_example'
DCMQI = REAL/'dcmqi_ct3slice'
SLICES = DATA/'ct-slices'

def need(p):
    if not p.exists(): pytest.skip(f"../shared/data/{p.relative_to(DATA) if p.is_relative_to(DATA) else p} not present")
    return p

# ---------------------------------------------------------------- NIfTI

def test_nifti_round_trip_keeps_geometry(tmp_path):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 2000, (9, 7, 5)).astype(np.int16)
    aff = np.array([[-0.6, 0.01, 0, 180.25], [0.0, -0.6, 0.02, 210.5], [0, 0.0, 1.25, -410.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(hu, aff)
    img.header.set_sform(aff, code=2)          # aligned
    img.header.set_qform(aff, code=1)          # scanner (quaternion approximates the small shear)
    src = tmp_path/'volume-7.nii.gz'
    nib.save(img, src)
    vol = read_nifti(src)
    assert vol.array.dtype == np.int16 and np.array_equal(vol.array, hu)
    labels = (hu > 0).astype(np.uint8) + (hu > 1500)
    out = write_labels(labels, vol, tmp_path/'pred.nii.gz')
    assert out.read_bytes()[:2] == b'\x1f\x8b'
    a, b = nib.load(src), nib.load(out)
    assert np.array_equal(np.asanyarray(b.dataobj), labels) and b.get_data_dtype() == np.uint8
    assert b.shape == a.shape
    assert np.array_equal(b.affine, a.affine)
    for f in ('qform_code', 'sform_code', 'quatern_b', 'quatern_c', 'quatern_d', 'qoffset_x', 'qoffset_y',
              'qoffset_z', 'srow_x', 'srow_y', 'srow_z', 'pixdim'):
        assert np.array_equal(b.header[f], a.header[f]), f
    assert np.array_equal(read_labels(out).array, labels)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
    with pytest.raises(LiverSegError, match='exists; use --force'): write_labels(labels, vol, out)
    write_labels(np.zeros_like(labels), vol, out, force=True)
    assert read_labels(out).array.max() == 0


def test_nifti_refusals(tmp_path):
    aff = np.diag([-1., -1, 2, 1])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), aff), tmp_path/'4d.nii.gz')
    with pytest.raises(LiverSegError, match=r'4d.nii.gz: expected a 3D volume, found shape \(4, 4, 3, 2\)'):
        read_nifti(tmp_path/'4d.nii.gz')
    f = np.zeros((4, 4, 3), np.float32); f[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(f, aff), tmp_path/'inf.nii')
    with pytest.raises(LiverSegError, match='NaN or infinite'): read_nifti(tmp_path/'inf.nii')
    with pytest.raises(LiverSegError, match='no such file'): read_nifti(tmp_path/'missing.nii.gz')
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 300, np.int16), aff), tmp_path/'big.nii')
    with pytest.raises(LiverSegError, match='expected 0..255'): read_labels(tmp_path/'big.nii')


def test_real_truncated_gz(tmp_path):
    src = need(TSEG/'example_ct.nii.gz')
    data = src.read_bytes()
    (tmp_path/'cut.nii.gz').write_bytes(data[:len(data)//3])
    with pytest.raises(LiverSegError) as e: read_nifti(tmp_path/'cut.nii.gz')
    assert str(e.value).startswith(str(tmp_path/'cut.nii.gz') + ': ') and '\n' not in str(e.value)


def test_real_example_ct_nifti():
    vol = read_nifti(need(TSEG/'example_ct.nii.gz'))
    assert nib.load(TSEG/'example_ct.nii.gz').get_data_dtype() == np.int32   # stored int32 ...
    assert vol.array.dtype == np.int16                                        # ... read as int16 (fits)
    assert vol.shape == (122, 101, 112)
    assert np.allclose(vol.spacing, 3.0)
    assert -1300 <= vol.array.min() <= -1000 and vol.array.max() > 1000       # resampled air dips below -1024
    assert abs(np.percentile(vol.array, 1) + 1024) < 30
    assert np.array_equal(vol.affine, nib.load(TSEG/'example_ct.nii.gz').affine)


def test_real_seed_reader_equivalence():
    "Our array, rotated per slice for display, equals the seed's rot90(get_fdata())."
    f = need(TSEG/'example_ct_sm.nii.gz')
    seed = np.rot90(nib.load(f).get_fdata())
    vol = read_nifti(f)
    assert seed.dtype == np.float64 and vol.array.dtype == np.int16
    for k in range(0, vol.shape[2], 7): assert np.array_equal(np.rot90(vol.array[:, :, k]), seed[:, :, k])


def test_write_labels_real_geometry(tmp_path):
    vol = read_nifti(need(TSEG/'example_ct.nii.gz'))
    out = write_labels((vol.array > 200).astype(np.uint8), vol, tmp_path/'bone.nii.gz')
    a, b = nib.load(TSEG/'example_ct.nii.gz'), nib.load(out)
    assert b.shape == a.shape and np.array_equal(b.affine, a.affine)
    assert a.header.get_qform(coded=True)[1] == b.header.get_qform(coded=True)[1]
    assert a.header.get_sform(coded=True)[1] == b.header.get_sform(coded=True)[1]
    assert np.array_equal(a.header.get_sform(), b.header.get_sform())
    assert np.array_equal(a.header.get_qform(), b.header.get_qform())

# ---------------------------------------------------------------- DICOM

def test_real_dicom_series_without_extension():
    folder = need(TSEG/'example_ct_dicom')
    files = find_dicom_files(folder)
    assert len(files) == 20 and all(p.suffix != '.dcm' for p in files)
    vol = read_dicom_series(folder)
    assert vol.shape == (512, 512, 20) and vol.array.dtype == np.int16
    assert -1100 <= vol.array.min() <= -1000 and vol.array.max() > 1000
    import pydicom
    hdrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert np.allclose(vol.spacing[:2], [float(x) for x in hdrs[0].PixelSpacing][::-1])
    # positions of the slices, in the order of the array, strictly increase along the normal
    ipp = np.array([vol.affine @ [0, 0, k, 1] for k in range(20)])[:, :3]
    ipp_lps = ipp*[-1, -1, 1]
    iop = np.array(hdrs[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    proj = ipp_lps @ normal
    assert (np.diff(proj) > 0).all()
    assert np.isclose(vol.spacing[2], np.median(np.diff(proj)))
    # every slice's header position is one of the affine's slice origins (in the same order)
    pairs = sorted(zip(files, hdrs), key=lambda fh: np.dot(np.array(fh[1].ImagePositionPatient, float), normal))
    assert np.allclose([np.array(h.ImagePositionPatient, float) for _, h in pairs], ipp_lps, atol=1e-3)
    # voxel data: slice k is the k-th slice's pixels, transposed, rescaled
    d = pydicom.dcmread(pairs[5][0])
    assert np.array_equal(vol.array[:, :, 5], (d.pixel_array*float(d.RescaleSlope) + float(d.RescaleIntercept)).T)


def test_real_dicom_matches_converter_nifti():
    "TotalSegmentator's NIfTI of the same series (j reversed) puts each voxel at the same RAS point, liver at liver HU."
    vol = read_dicom_series(need(TSEG/'example_ct_dicom'))
    seg = nib.load(need(TSEG/'example_seg_dicom.nii.gz'))
    assert seg.shape == vol.shape
    nj = vol.shape[1]
    for i, j, k in [(0, 0, 0), (511, 0, 19), (100, 300, 7), (511, 511, 0)]:
        assert np.allclose(vol.affine @ [i, j, k, 1], seg.affine @ [i, nj-1-j, k, 1], atol=1e-3)
    liver = np.asanyarray(seg.dataobj)[:, ::-1, :] == 5
    assert liver.sum() > 1000
    hu = float(np.median(vol.array[liver]))
    assert 20 < hu < 120, hu                      # liver parenchyma; misaligned masks land on fat/air/bone


def test_real_dicom_matches_nibabel_wrapper():
    "nibabel's own DICOM wrapper (LPS, rows/columns swapped) gives the same in-plane geometry."
    pytest.importorskip('nibabel.nicom.dicomwrappers')
    import warnings
    from nibabel.nicom import dicomwrappers as dw
    folder = need(DCMQI/'ct-3slice')
    vol = read_dicom_series(folder)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        w = dw.wrapper_from_file(str(folder/'03.dcm'))
    lps = np.diag([-1., -1, 1, 1]) @ vol.affine
    assert np.allclose(lps[:3, 0], w.affine[:3, 1]) and np.allclose(lps[:3, 1], w.affine[:3, 0])
    assert np.allclose(lps[:3, 3], w.affine[:3, 3])


def _read_nrrd(path):
    "Minimal NRRD reader (gzip, short, 3D): (array in X, Y, Z order, RAS affine)."
    raw = path.read_bytes()
    head, body = raw.split(b'\n\n', 1)
    h = dict(l.split(': ', 1) for l in head.decode().splitlines() if ': ' in l)
    assert h['type'] == 'short' and h['encoding'] == 'gzip' and h['space'] == 'left-posterior-superior'
    sizes = [int(s) for s in h['sizes'].split()]
    arr = np.frombuffer(gzip.decompress(body), '<i2').reshape(sizes[::-1]).transpose(2, 1, 0)
    dirs = [[float(x) for x in v.split(',')] for v in re.findall(r'\(([^)]*)\)', h['space directions'])]
    origin = [float(x) for x in re.findall(r'\(([^)]*)\)', h['space origin'])[0].split(',')]
    aff = np.eye(4); aff[:3, :3] = np.array(dirs).T; aff[:3, 3] = origin
    return arr, np.diag([-1., -1, 1, 1]) @ aff


def test_real_dcmqi_slices_named_against_their_order():
    import pydicom
    folder = need(DCMQI/'ct-3slice')
    vol = read_dicom_series(folder)
    assert vol.shape == (512, 512, 3) and vol.array.min() == -3024
    d03 = pydicom.dcmread(folder/'03.dcm')
    assert np.isclose(vol.affine[2, 3], float(d03.ImagePositionPatient[2]))    # first slice is 03.dcm
    assert np.array_equal(vol.array[:, :, 0], (d03.pixel_array + int(d03.RescaleIntercept)).T)
    d01 = pydicom.dcmread(folder/'01.dcm')
    assert np.array_equal(vol.array[:, :, 2], (d01.pixel_array + int(d01.RescaleIntercept)).T)
    # the dcmqi liver segmentation (NRRD, made by 3D Slicer from this series) is on exactly our grid
    seg, seg_aff = _read_nrrd(need(DCMQI/'liver_seg.nrrd'))
    assert seg.shape == vol.shape
    assert np.allclose(seg_aff, vol.affine, atol=1e-4)
    liver = seg == 1
    assert liver.sum() > 1000 and 20 < float(np.median(vol.array[liver])) < 150


def test_write_labels_for_dicom_input(tmp_path):
    vol = read_dicom_series(need(DCMQI/'ct-3slice'))
    out = write_labels(np.zeros(vol.shape, np.uint8), vol, tmp_path/'seg.nii.gz')
    img = nib.load(out)
    assert np.allclose(img.affine, vol.affine, atol=1e-4)
    assert img.header.get_qform(coded=True)[1] == 1 and img.header.get_sform(coded=True)[1] == 1


def test_pydicom_ct_small_equals_fastai_scaled_px():
    import pydicom
    from pydicom.data import get_testdata_file
    pytest.importorskip('fastai')
    import fastai.medical.imaging  # patches DcmDataset.scaled_px
    f = get_testdata_file('CT_small.dcm')
    vol = read_dicom_series(f)
    assert vol.shape == (128, 128, 1)
    assert np.allclose(vol.spacing, (0.661468, 0.661468, 5.0))       # one slice: SliceThickness
    assert np.array_equal(vol.array[:, :, 0], pydicom.dcmread(f).scaled_px.numpy().T)


def test_pydicom_refusals(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    with pytest.raises(LiverSegError, match='MR_truncated.dcm'): read_dicom_series(get_testdata_file('MR_truncated.dcm'))
    mr = tmp_path/'mr'; mr.mkdir(); shutil.copy(get_testdata_file('MR_small.dcm'), mr/'IM1')
    with pytest.raises(LiverSegError, match="IM1: modality is 'MR', expected CT"): read_dicom_series(mr)
    ct = tmp_path/'ct'; ct.mkdir()
    data = Path(get_testdata_file('CT_small.dcm')).read_bytes()
    (ct/'IM1').write_bytes(data[:-3000])
    with pytest.raises(LiverSegError, match='IM1: .*truncated or corrupt'): read_dicom_series(ct)
    (tmp_path/'empty').mkdir()
    with pytest.raises(LiverSegError, match='no DICOM files found'): read_dicom_series(tmp_path/'empty')


def test_real_dicom_gap_and_mixed(tmp_path):
    src = need(TSEG/'example_ct_dicom')
    files = find_dicom_files(src)
    gap = tmp_path/'gap'; gap.mkdir()
    for f in files[:5] + files[7:]: shutil.copy(f, gap/f.name)
    with pytest.raises(LiverSegError, match='missing slices: gap of'): read_dicom_series(gap)
    mixed = tmp_path/'mixed'; mixed.mkdir()
    for f in files[:3]: shutil.copy(f, mixed/f.name)
    for f in (DCMQI/'ct-3slice').glob('*.dcm'): shutil.copy(f, mixed/f.name)
    with pytest.raises(LiverSegError, match='series found'): read_dicom_series(mixed)

# ---------------------------------------------------------------- slice folders and masks

def test_real_ct_slices():
    folder = need(SLICES)
    df = find_slice_pairs(folder)
    assert len(df) == 1092 and list(df['case'].unique()) == [str(i) for i in range(8)]
    assert list(df.columns) == ['case', 'slice', 'image', 'mask']
    for case, rows in df.groupby('case', sort=False):
        assert (np.diff(rows['slice']) == 1).all()
    rows = df[df['case'] == '1']
    imgs, labs = read_slice_volume(rows)
    assert imgs.shape == (512, 512, 27) and imgs.dtype == np.uint8
    assert labs.shape == imgs.shape and set(np.unique(labs)) == {0, 1, 2}
    # every mask of every case decodes to {0, 1, 2} with liver present
    seen = set()
    for m in df['mask']:
        v = set(np.unique(read_mask(m)).tolist())
        assert v <= {0, 1, 2} and 1 in v, m
        seen |= v
    assert seen == {0, 1, 2}


def _png(path, arr): Image.fromarray(np.asarray(arr, np.uint8)).save(path); return path


@pytest.mark.parametrize('enc,values', [('012', [0, 1, 2]), ('127', [0, 127, 255]), ('255', [0, 255])])
def test_mask_encodings(tmp_path, enc, values):
    m = np.array([values*2]*3)
    expected = np.array([[0, 1, 2]*2]*3) if enc != '255' else np.array([[0, 1]*2]*3)
    got = read_mask(_png(tmp_path/f'{enc}.png', m))
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    rgb = Image.fromarray(np.stack([m.astype(np.uint8)]*3, -1)); rgb.save(tmp_path/f'{enc}_rgb.png')
    assert np.array_equal(read_mask(tmp_path/f'{enc}_rgb.png'), expected)


def test_mask_invalid_and_jpeg(tmp_path):
    p = _png(tmp_path/'bad.png', [[0, 1, 127, 200]])
    with pytest.raises(LiverSegError) as e: read_mask(p)
    assert str(e.value) == f"{p}: unknown mask values [0, 1, 127, 200]; expected {{0,1,2}}, {{0,127,255}} or {{0,255}}"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path/'m.jpg')
    with pytest.raises(LiverSegError, match='JPEG masks are not supported'): read_mask(tmp_path/'m.jpg')
    colour = np.zeros((2, 2, 3), np.uint8); colour[0, 0] = [255, 0, 0]
    Image.fromarray(colour).save(tmp_path/'colour.png')
    with pytest.raises(LiverSegError, match='colour mask'): read_mask(tmp_path/'colour.png')
    assert np.array_equal(decode_mask(np.zeros((2, 2), np.uint8)), np.zeros((2, 2)))


def test_slice_folder_errors(tmp_path):
    (tmp_path/'images').mkdir(); (tmp_path/'masks').mkdir()
    _png(tmp_path/'images'/'3_1.png', np.zeros((4, 4)))
    _png(tmp_path/'masks'/'3_1.png', np.zeros((4, 5)))
    _png(tmp_path/'masks'/'3_2.png', np.zeros((4, 4)))
    with pytest.raises(LiverSegError, match=r'3_2.png: mask without an image'): find_slice_pairs(tmp_path)
    (tmp_path/'masks'/'3_2.png').unlink()
    df = find_slice_pairs(tmp_path)
    with pytest.raises(LiverSegError, match=r'masks/3_1.png: mask is \(4, 5\), image 3_1.png is \(4, 4\)'):
        read_slice_volume(df)
    assert len(find_slice_pairs(tmp_path, masks=False)) == 1
    _png(tmp_path/'images'/'scan.png', np.zeros((4, 4)))
    with pytest.raises(LiverSegError, match='scan.png: slice name must be'): find_slice_pairs(tmp_path, masks=False)
    (tmp_path/'empty').mkdir()
    with pytest.raises(LiverSegError, match='no slice images found'): find_slice_pairs(tmp_path/'empty', masks=False)


def test_flat_prediction_folder(tmp_path):
    for n in ('b_2', 'b_10', '12_1', '9_4'): _png(tmp_path/f'{n}.jpg', np.full((3, 3), 7))
    df = find_slice_pairs(tmp_path, masks=False)
    assert list(zip(df['case'], df['slice'])) == [('9', 4), ('12', 1), ('b', 2), ('b', 10)]
    imgs, labs = read_slice_volume(df[df['case'] == 'b'])
    assert imgs.shape == (3, 3, 2) and labs is None
    assert read_image(tmp_path/'b_2.jpg').ndim == 2

# ---------------------------------------------------------------- atomic writes

def test_atomic_path_folders(tmp_path):
    with pytest.raises(LiverSegError, match='output folder does not exist'):
        with atomic_path(tmp_path/'nope'/'x.nii.gz') as t: pass
    ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK): pytest.skip("running as a user who can write to read-only folders (root)")
        with pytest.raises(LiverSegError, match='not writable'):
            with atomic_path(ro/'x.png') as t: t.write_bytes(b'')
    finally: ro.chmod(0o755)


def test_atomic_path_model_folder(tmp_path):
    dest = tmp_path/'model'
    with atomic_path(dest) as t:
        t.mkdir(); (t/'config.json').write_text('{}')
    assert (dest/'config.json').exists()
    with atomic_path(dest, force=True) as t:
        t.mkdir(); (t/'config.json').write_text('{"v": 2}')
    assert (dest/'config.json').read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']

# ---------------------------------------------------------------- 3D-IRCADb (issue 14)

IRCADB = DATA/'ircadb-hu'

def _zip_series(case, structure):
    "{position along z: 0/1 mask as (X, Y)} of one mask series read straight from MASKS_DICOM.zip with pydicom"
    import io, zipfile, pydicom
    z = zipfile.ZipFile(case/'MASKS_DICOM.zip')
    out = {}
    for n in z.namelist():
        if f'/{structure}/' in n and not n.endswith('/'):
            ds = pydicom.dcmread(io.BytesIO(z.read(n)))
            out[round(float(ds.ImagePositionPatient[2]), 2)] = (ds.pixel_array > 0).T
    return out

def test_real_ircadb_labels():
    "Patient 1: 2,865,131 liver voxels (its liver mask, tumours inside it), and tumour == the union of the 7 livertumor masks"
    from liver_seg.dicom import read_ircadb_case
    case = need(IRCADB/'3Dircadb1.1')
    vol, labels = read_ircadb_case(case)
    assert vol.shape == labels.shape == (512, 512, 129) and vol.array.dtype == np.int16
    assert int((labels > 0).sum()) == 2_865_131
    zs = [round(float(z), 2) for z in (vol.affine @ np.c_[np.zeros((129, 2)), np.arange(129), np.ones(129)].T)[2]]
    liver = _zip_series(case, 'liver')
    union = np.zeros(labels.shape, bool)
    for t in [f'livertumor{i:02d}' for i in range(1, 8)]:
        for z, m in _zip_series(case, t).items(): union[:, :, zs.index(z)] |= m
    assert union.sum() > 0 and np.array_equal(labels == 2, union)
    assert np.array_equal(labels > 0, np.stack([liver[z] for z in zs], -1) | union)

def test_real_ircadb_patient7_tumor_folder_is_not_liver_tumour():
    "Patient 7's `tumor/` mask lies outside the liver: it is left out, so the case has liver and no tumour"
    from liver_seg.dicom import read_ircadb_case
    _, labels = read_ircadb_case(need(IRCADB/'3Dircadb1.7'))
    assert np.bincount(labels.ravel(), minlength=3).tolist()[1:] == [1_461_944, 0]
