"The notebooks as documentation (issue 17, item 9): nbdev's docs processor runs every page, and the outputs they keep are small and stable"
import json, re, shutil, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))


def test_nbdev_proc_nbs_runs_every_page(tmp_path):
    "What a docs build does first: run each page's exported and importing cells, in a copy (it rewrites nbdev.yml)"
    shutil.copytree(ROOT/'nbs', tmp_path/'nbs')
    shutil.copy(ROOT/'pyproject.toml', tmp_path)
    r = subprocess.run(['nbdev-proc-nbs'], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Found cells containing imports and other code' not in r.stderr, r.stderr[-3000:]
    assert {p.name for p in (tmp_path/'_proc').glob('*.ipynb')} == {p.name for p in NBS}


def _outputs(nb):
    for c in nb['cells']:
        for o in c.get('outputs', []): yield c, o


@pytest.mark.parametrize('path', NBS, ids=[p.stem for p in NBS])
def test_outputs_are_small_stable_and_made_of_no_shared_data(path):
    nb = json.loads(path.read_text())
    for c, o in _outputs(nb):
        data = o.get('data', {})
        where = f"{path.name} cell {c.get('id')}"
        assert 'application/vnd.jupyter.widget-view+json' not in data, f"{where}: widget state"
        assert len(json.dumps(o)) < 300_000, f"{where}: an output of {len(json.dumps(o))} bytes"
        text = ''.join(o.get('text', '')) + ''.join(data.get('text/plain', '')) + ''.join(data.get('text/html', ''))
        assert not re.search(r'/tmp/tmp\w{8}|tmp-\d{2,}\.|pytest-of-', text), f"{where}: a path that changes every run: {text[:200]}"
        src = ''.join(c['source'])
        assert 'shared/data' not in src and 'have_real' not in src, f"{where}: output of a cell that reads ../shared (never commit it)"
    assert 'widgets' not in nb.get('metadata', {}), f"{path.name}: widget state in the metadata"
