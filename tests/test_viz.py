"Figures and the slice viewer of liver_seg.viz: panels, saved PNGs, error colours, slider behaviour."
import subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from liver_seg import viz, viewer

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / 'shared' / 'data' / 'ct-slices'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def phantom(nx=48, ny=40, nz=10):
    "HU int16 + labels uint8 in (X, Y, Z): body, liver ellipsoid, tumour inside it."
    x, y, z = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), np.linspace(-1, 1, nz), indexing='ij')
    hu = np.full((nx, ny, nz), -1000, np.int16)
    hu[x ** 2 + y ** 2 < .8] = 40
    liver = ((x + .3) / .4) ** 2 + (y / .4) ** 2 + (z / .7) ** 2 < 1
    tumor = ((x + .3) / .15) ** 2 + (y / .15) ** 2 + (z / .3) ** 2 < 1
    hu[liver], hu[tumor] = 90, 30
    lab = np.zeros(hu.shape, np.uint8)
    lab[liver], lab[tumor] = 1, 2
    return hu, lab


@pytest.fixture(scope='module')
def case():
    hu, lab = phantom()
    k = hu.shape[2] // 2
    return hu, lab, np.rot90(hu[:, :, k]), np.rot90(lab[:, :, k])


def saved_png(fn, tmp_path, **kw):
    p = tmp_path / f'{fn.__name__}.png'
    out = fn(**kw, save=p)
    assert out is not None and p.stat().st_size > 1000
    assert p.read_bytes()[:8] == PNG_MAGIC
    w, h = Image.open(p).size
    assert w > 100 and h > 100
    return out


def test_plot_sample(case, tmp_path):
    _, _, img, msk = case
    fig = saved_png(viz.plot_sample, tmp_path, image=img, mask=msk)
    assert len(fig.axes) == 4
    assert [a.get_title() for a in fig.axes] == ['Original', 'Windowed (liver)', 'Mask', 'Overlay']
    fig8 = viz.plot_sample([(viz.display_image(img) * 255).astype(np.uint8), msk])
    assert fig8.axes[1].get_title() == 'No window (8-bit)'


def test_plot_overlay_legend_and_colours(case, tmp_path):
    _, _, img, msk = case
    fig = saved_png(viz.plot_overlay, tmp_path, image=img, labels=msk)
    ax, = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['liver', 'tumor']
    layer = ax.images[1].get_array()
    r, g, b, a = layer[msk == 1][0]
    assert g > r and g > b and a > 0
    r, g, b, a = layer[msk == 2][0]
    assert r > b and g > b            # amber
    assert (layer[msk == 0][:, 3] == 0).all()


def test_plot_errors_colours_and_dice(case, tmp_path):
    _, _, img, msk = case
    pred = msk.copy()
    fp = np.argwhere((msk == 0) & (viz.display_image(img) > 0))[0]     # a body pixel outside the liver
    fn = np.argwhere(msk == 1)[0]
    pred[fp[0], fp[1]], pred[fn[0], fn[1]] = 1, 0
    fig = saved_png(viz.plot_errors, tmp_path, image=img, pred=pred, gt=msk)
    assert len(fig.axes) == 2
    liver_ax, tumor_ax = fig.axes
    n = int((msk > 0).sum())
    assert liver_ax.get_title() == f'liver: Dice {2 * (n - 1) / (2 * (n - 1) + 2):.3f}'
    assert tumor_ax.get_title() == 'tumor: Dice 1.000'
    layer = liver_ax.images[1].get_array()
    r, g, b, _ = layer[tuple(fp)]
    assert b > r and b > g                         # false positive is blue
    r, g, b, _ = layer[tuple(fn)]
    assert r > g and r > b                         # false negative is red
    labels = [t.get_text() for t in liver_ax.get_legend().get_texts()]
    assert labels == ['true positive (%s px)' % f'{n - 1:,}', 'false positive (1 px)', 'false negative (1 px)']
    assert len(viz.plot_errors(img, pred, msk, cls='tumor').axes) == 1


def test_plot_errors_rendered_pixel_is_blue(case):
    _, _, img, msk = case
    pred = msk.copy()
    pred[2:8, 2:8] = 1                             # air corner: 6 x 6 false positives
    fig = viz.plot_errors(img, pred, msk, cls='liver')
    r, g, b, _ = (int(v) for v in viz.rendered_rgba(fig.axes[0], 5, 5))
    assert b > 150 and b > r + 60 and b > g + 40


def test_plot_montage(case, tmp_path):
    hu, lab, _, _ = case
    fig = saved_png(viz.plot_montage, tmp_path, volume=hu, labels=lab, n=6)
    assert len(fig.axes) == 6
    idx = [int(a.get_title().split()[1]) for a in fig.axes]
    present = np.flatnonzero(lab.any((0, 1)))
    assert idx[0] == present[0] and idx[-1] == present[-1] and idx == sorted(set(idx))
    fig = viz.plot_montage(hu, lab, n=[1, 5], pred=np.roll(lab, 1, 0))
    assert len(fig.axes) == 2 and 'Dice' in fig.axes[1].get_title()
    assert len(viz.plot_montage(hu, n=3).axes) == 3


def test_learning_curves_from_csv(tmp_path):
    from liver_seg.history import plot_learning_curves
    csv = tmp_path / 'history.csv'
    pd.DataFrame(dict(epoch=[0, 1, 2], train_loss=[1, .6, .4], valid_loss=[.9, .7, .6], liver_dice=[.5, .8, .9],
                      tumor_dice=[0, .2, .3], time=['00:01'] * 3)).to_csv(csv, index=False)
    out = plot_learning_curves(csv, tmp_path / 'curves.png', title='run')
    assert out.read_bytes()[:8] == PNG_MAGIC
    fig = plot_learning_curves(csv)
    assert [a.get_title() for a in fig.axes] == ['loss', 'validation Dice']
    assert len(fig.axes[0].lines) == 2 and fig.axes[1].get_ylim() == (0, 1)   # Dice of both classes on one 0-1 axis


def test_plot_foreground_hist(case, tmp_path):
    _, lab, _, _ = case
    df = pd.DataFrame(dict(split=['train'] * 6 + ['valid'] * 4, liver_frac=(lab > 0).mean((0, 1)),
                           tumor_frac=(lab == 2).mean((0, 1))))
    fig = saved_png(viz.plot_foreground_hist, tmp_path, df=df)
    assert len(fig.axes) == 2
    assert [len(a.get_legend().get_texts()) for a in fig.axes] == [2, 2]


def test_viewer_slider_changes_slice(case):
    hu, lab, _, _ = case
    v = viewer.view_volume(hu, lab)
    first, png = v.current_slice, v.image.value
    assert png[:8] == PNG_MAGIC
    other = [k for k in np.flatnonzero(lab.any((0, 1))) if k != first][0]    # another slice with labels
    v.slider.value = other
    assert v.current_slice == v.slider.value != first
    assert v.image.value != png
    s, l = viz.display_stack(hu, lab)
    assert np.array_equal(v.rgb, viewer.render_slice(s[..., v.current_slice], l[..., v.current_slice]))
    before = v.rgb
    v.overlay.value = False
    assert not np.array_equal(v.rgb, before)
    v.window.value = 'abdomen_soft'
    assert np.array_equal(v.rgb, viewer.render_slice(s[..., v.current_slice], None, 'abdomen_soft'))


def test_viewer_with_prediction_modes(case):
    hu, lab, _, _ = case
    v = viewer.SliceViewer(hu, lab, pred=np.roll(lab, 2, 0))
    assert list(v.mode.options) == ['labels', 'prediction', 'errors']
    v.mode.value = 'errors'
    k = v.current_slice
    _, l = viz.display_stack(hu, lab); _, p = viz.display_stack(hu, np.roll(lab, 2, 0))
    fp = np.argwhere((p[..., k] > 0) & (l[..., k] == 0))[0]
    r, g, b = (int(c) for c in v.rgb[tuple(fp)])
    assert b > r and b > g


def test_viewer_from_nifti_path(case, tmp_path):
    nib = pytest.importorskip('nibabel')
    hu, lab, _, _ = case
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / 'volume-0.nii.gz')
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / 'segmentation-0.nii.gz')
    v = viewer.SliceViewer(tmp_path / 'volume-0.nii.gz', tmp_path / 'segmentation-0.nii.gz')
    from liver_seg.io import CTVolume, to_canonical
    can = lambda a: to_canonical(CTVolume(a, np.eye(4))).array    # an identity affine is RAS: canonical L, A, S flips i
    s, l = viz.display_stack(can(hu), can(lab))
    assert v.images.shape == s.shape and np.array_equal(v.labels, l)
    png = v.image.value
    v.slider.value = 0
    assert v.image.value != png


def test_viewer_from_slice_folder(case, tmp_path):
    hu, lab, _, _ = case
    s, l = viz.display_stack(hu, lab)
    (tmp_path / 'images').mkdir(); (tmp_path / 'masks').mkdir()
    for k in range(s.shape[-1]):
        Image.fromarray((viz.display_image(s[..., k]) * 255).astype(np.uint8)).save(tmp_path / 'images' / f'7_{k + 20}.png')
        Image.fromarray(np.array([0, 127, 255], np.uint8)[l[..., k]]).save(tmp_path / 'masks' / f'7_{k + 20}.png')
    v = viewer.SliceViewer(tmp_path)
    assert v.images.dtype == np.uint8 and v.window.value == 'none'
    assert np.array_equal(v.labels, l)
    assert v.names == list(range(20, 20 + s.shape[-1]))
    before = v.image.value
    v.slider.value = 0
    assert v.image.value != before and v.info.value.startswith('20 ')


def test_real_slices():
    if not (REAL / 'images').is_dir(): pytest.skip('../shared/data/ct-slices not present')
    v = viewer.SliceViewer(REAL, case='1')
    assert v.images.shape[:2] == (512, 512) and v.labels is not None
    before = v.image.value
    v.slider.value = 0
    assert v.image.value != before
    fig = viz.plot_montage(v.images, v.labels, n=4, orient='display', names=v.names)
    assert len(fig.axes) == 4


def test_import_needs_no_pyplot_or_torch():
    code = "import sys, liver_seg.viz; print('matplotlib.pyplot' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']
