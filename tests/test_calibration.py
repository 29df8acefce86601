"The calibrated window (`dicom_windows.lits`, notebook 01a_calibration) maps each tissue's median in ircadb-hu to the 8-bit slices' median of that tissue."
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from liver_seg.calibration import width_agreement
from liver_seg.dicom import read_ircadb_case
from liver_seg.io import to_canonical, CTVolume
from liver_seg.windows import dicom_windows, gray_window, display_stack

DATA = (Path(__file__).parents[1]/'..'/'shared'/'data').resolve()
TOLERANCE = 15  # gray levels, as 01a_calibration states: the liver's median varies 150-180 among the slice patients

def need(p):
    if not p.exists(): pytest.skip(f"../shared/data/{p.name} not present")
    return p

def _body(img):
    "The largest filled component above the window's bottom: the patient"
    lab, n = ndi.label(ndi.binary_fill_holes(ndi.binary_opening(img > 0, iterations=2)))
    return lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1

def _mode(v, lo, hi):
    h = ndi.gaussian_filter1d(np.bincount(v[(v >= lo) & (v <= hi)] - lo, minlength=hi - lo + 1).astype(float), 3)
    return lo + int(np.argmax(h))

def _tissues(gray, labels, bodies, soft_range):
    "Medians of air, liver, lesion and modes of fat and soft tissue of gray-level (or HU) slices"
    v, m, b = gray.astype(np.int64), labels, bodies
    return dict(air=np.median(v[~b]), liver=np.median(v[m == 1]), lesion=np.median(v[m == 2]) if (m == 2).any() else np.nan,
                fat=_mode(v[b], *soft_range[0]), soft=_mode(v[b & (m == 0)], *soft_range[1]))

@pytest.fixture(scope='module')
def slices():
    root = need(DATA/'ct-slices')
    files = sorted((root/'images').glob('*.png'))[::3]
    img = np.stack([np.asarray(Image.open(f)) for f in files])
    msk = np.stack([np.asarray(Image.open(root/'masks'/f.name)) for f in files])
    return img, np.select([msk == 127, msk == 255], [1, 2], 0), np.array([f.stem.rsplit('_', 1)[0] for f in files])

def test_slices_width_is_400(slices):
    "The histogram's pattern of 1 and 2 HU values per gray level is that of a 400 HU wide window, and no other"
    hist = np.bincount(slices[0].ravel(), minlength=256)
    assert width_agreement(hist, dicom_windows.lits[0]) > 0.99
    assert max(width_agreement(hist, w) for w in (300, 350, 390, 410, 450, 500)) < 0.9

def test_tissue_medians_match(slices):
    img, lab, case = slices
    body = np.stack([_body(s) for s in img])
    per_case = [_tissues(img[case == c], lab[case == c], body[case == c], ((5, 110), (90, 200))) for c in np.unique(case)]
    g = {t: np.median([d[t] for d in per_case]) for t in per_case[0]}  # the median patient: case 4's huge tumour counts once
    mapped = []
    for p in ('3Dircadb1.1', '3Dircadb1.7'):
        vol, labels = read_ircadb_case(need(DATA/'ircadb-hu'/p))
        hu, lb = display_stack(to_canonical(vol).array), display_stack(to_canonical(CTVolume(labels, vol.affine)).array)
        keep = lb.reshape(len(lb), -1).max(1) > 0                          # slices with liver, like the slice dataset
        gw = gray_window(hu[keep])
        mapped.append(_tissues(gw, lb[keep], np.stack([_body(s) for s in gw]), ((5, 110), (90, 200))))
    for tissue in ('air', 'fat', 'soft', 'liver', 'lesion'):
        m = np.nanmean([t[tissue] for t in mapped])
        assert abs(m - g[tissue]) <= TOLERANCE, (tissue, m, g[tissue])
    assert abs(np.nanmean([t['fat'] for t in mapped]) - g['fat']) <= 5  # the anchor of the level: tight
