"What `liver-seg predict` writes beside the labels (issue 17): statistics, preview, probabilities, DICOM SEG, through the command line"
import json, subprocess, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from liver_seg.io import read_labels, read_nifti
from liver_seg.synth import write_chaos_case, write_lits_case

sys.path.insert(0, str(Path(__file__).parent))
from models import untrained_model_folder  # noqa: E402

SHAPE = dict(shape=(48, 40, 8), spacing=(1.5, 1.2, 4.0))


def cli(*args):
    r = subprocess.run([sys.executable, '-m', 'liver_seg', *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    "An untrained U-Net folder: its labels are arbitrary but the same in every output of one run, which is what is checked"
    return untrained_model_folder(tmp_path_factory.mktemp('m')/'model', arch='resnet18', precision='fp32', seed=3)


@pytest.fixture(scope='module')
def lits(tmp_path_factory):
    d = tmp_path_factory.mktemp('lits')
    for i in range(2): write_lits_case(d, i, axcodes=('R', 'A', 'S') if i else None, seed=(4, i), **SHAPE)
    return d


@pytest.fixture(scope='module')
def model_without_rule(tmp_path_factory):
    "The same network with the tumour rule off (`tumor_contrast` null): its random tumour is no darker than its liver, and the rule would drop it"
    return untrained_model_folder(tmp_path_factory.mktemp('m')/'model', arch='resnet18', precision='fp32', seed=3, tumor_contrast=None)


def test_statistics_are_the_labels_counted(model_without_rule, lits, tmp_path):
    "The JSON beside the output is the statistics of the labels written, on the CT read; this case's labels hold tumour"
    from liver_seg.report import label_statistics
    out = tmp_path/'seg.nii.gz'
    cli('predict', model_without_rule, lits/'volume-0.nii.gz', out, '--statistics', '-q')
    stats, lab = json.loads((tmp_path/'seg.json').read_text()), read_labels(out)
    assert (lab.array == 2).any() and (lab.array == 1).any()   # both classes, so every number below is exercised
    assert stats == json.loads(json.dumps(label_statistics(lab, read_nifti(lits/'volume-0.nii.gz'))))
    vox_ml = abs(np.linalg.det(lab.affine[:3, :3])) / 1000
    assert stats['classes']['tumor']['volume_ml'] == pytest.approx((lab.array == 2).sum() * vox_ml, rel=1e-6)
    assert stats['n_lesions'] == len(stats['lesions']) == ndi.label(lab.array == 2, np.ones((3, 3, 3)))[1] > 0


def test_folder_of_volumes_gets_a_json_each_and_one_csv(model, lits, tmp_path):
    cli('predict', model, lits, tmp_path/'preds', '--statistics', '-q')
    table = pd.read_csv(tmp_path/'preds'/'statistics.csv')
    assert list(table['case']) == ['volume-0', 'volume-1']
    for i in range(2):
        s = json.loads((tmp_path/'preds'/f'segmentation-{i}.json').read_text())
        assert table.loc[i, 'liver_volume_ml'] == pytest.approx(s['classes']['liver']['volume_ml'])


def test_probabilities_argmax_is_the_labels_before_postprocessing(model, lits, tmp_path):
    out = tmp_path/'raw.nii.gz'
    cli('predict', model, lits/'volume-1.nii.gz', out, '--probabilities', '--no-postprocess', '-q')
    lab, pimg = nib.load(out), nib.load(tmp_path/'raw_probabilities.nii.gz')
    p = pimg.get_fdata(dtype=np.float32)
    assert p.shape == lab.shape + (3,)
    np.testing.assert_allclose(pimg.affine, lab.affine, atol=1e-6)
    np.testing.assert_allclose(p.sum(-1), 1, atol=3e-4)
    top = np.sort(p, -1)
    clear = top[..., -1] - top[..., -2] > 3e-5
    assert clear.mean() > 0.99
    assert (p.argmax(-1) == np.asarray(lab.dataobj))[clear].all()
    assert len(np.unique(np.asarray(lab.dataobj))) > 1


def test_tumour_rule_by_default_and_not_with_no_postprocess(model, lits, tmp_path):
    "A slice folder's masks are `tumor_by_contrast` of the network's labels in the first window's gray; --no-postprocess writes the labels"
    from liver_seg.io import read_image, read_mask
    from liver_seg.postprocess import tumor_by_contrast
    cli('prepare', lits, tmp_path/'slices', '--windows', 'liver,custom', '--format', 'png', '-q')  # the model's window channels, lossless
    cli('predict', model, tmp_path/'slices'/'images', tmp_path/'ruled', '-q')
    cli('predict', model, tmp_path/'slices'/'images', tmp_path/'raw', '--no-postprocess', '-q')
    names = sorted(p.name for p in (tmp_path/'ruled').iterdir())
    raw = np.stack([read_mask(tmp_path/'raw'/n, '012') for n in names])
    gray = np.stack([read_image(tmp_path/'slices'/'images'/n)[..., 0] for n in names])
    ruled = np.stack([read_mask(tmp_path/'ruled'/n, '012') for n in names])
    np.testing.assert_array_equal(ruled, tumor_by_contrast(raw, gray))
    assert (ruled != raw).sum() > 50   # the rule changed this network's labels, so the two paths can be told apart


def test_preview_png_beside_the_labels(model, lits, tmp_path):
    cli('predict', model, lits/'volume-0.nii.gz', tmp_path/'seg.nii.gz', '--preview', '-q')
    assert (tmp_path/'seg.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_dicom_seg_round_trip(model, tmp_path):
    pytest.importorskip('highdicom')
    from liver_seg.report import read_dicom_seg
    case = write_chaos_case(tmp_path/'case', seed=9, **SHAPE)
    cli('predict', model, case/'DICOM', tmp_path/'seg.nii.gz', '-q')
    cli('predict', model, case/'DICOM', tmp_path/'seg.dcm', '--format', 'dicom-seg', '-q')
    nii = read_labels(tmp_path/'seg.nii.gz').array
    assert len(np.unique(nii)) > 1
    assert np.array_equal(read_dicom_seg(tmp_path/'seg.dcm', case/'DICOM'), nii)


def test_dicom_seg_needs_a_dicom_input_and_a_dcm_name(model, lits, tmp_path):
    for args, msg in (([lits/'volume-0.nii.gz', tmp_path/'x.dcm'], 'not one'), ([lits/'volume-0.nii.gz', tmp_path/'x.nii.gz'], 'end in .dcm')):
        r = subprocess.run([sys.executable, '-m', 'liver_seg', 'predict', str(model), *map(str, args), '--format', 'dicom-seg'],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_says_what_each_output_is():
    h = ' '.join(subprocess.run([sys.executable, '-m', 'liver_seg', 'predict', '-h'], capture_output=True, text=True).stdout.split())
    assert '--statistics' in h and '.json' in h and 'mean HU' in h
    assert '--preview' in h and '.png' in h
    assert '--probabilities' in h and 'softmax' in h
    assert '--format {nifti,dicom-seg}' in h and 'DICOM Segmentation' in h
