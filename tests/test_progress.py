"What `liver-seg prepare` and `liver-seg train` print while they work, read from a pipe as a log file or CI would (issue 17, item 5)"
import re, subprocess, sys

import pandas as pd
import pytest

from liver_seg.synth import write_lits_case, write_chaos_case

CLI = [sys.executable, '-c', 'import sys; from liver_seg.cli import main; sys.exit(main())']
FAST = ['--arch', 'simple_cnn', '--no-pretrained', '--size', '32', '--bs', '4', '--precision', 'fp32', '--valid-cases', 'volume-1']
SLICES = 10 + 8 + 6 # the phantoms below

def run(*args):
    "Run `liver-seg ARGS` with stdout and stderr piped; check its exit status"
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"liver-seg {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}"
    return r

def bar_states(err:str) -> list:
    "(done, total) of every state of the tqdm bar written to `err`"
    return [(int(a), int(b)) for a, b in re.findall(r'\| *(\d+)/(\d+) \[', err)]

@pytest.fixture(scope='module')
def src(tmp_path_factory):
    "Two LiTS phantoms and a CHAOS one (its slices counted from its mask images)"
    tmp = tmp_path_factory.mktemp('progress')
    write_lits_case(tmp/'src', 0, shape=(48, 40, 10), seed=1)
    write_lits_case(tmp/'src', 1, shape=(48, 40, 8), seed=2)
    write_chaos_case(tmp/'src'/'chaos'/'7', shape=(48, 40, 6), seed=3)
    return tmp/'src'

@pytest.fixture(scope='module')
def slices(src):
    out = src.parent/'slices'
    r = run('prepare', src, out, '--format', 'png')
    assert r.stdout.startswith(f'prepared {SLICES} slices of 3 cases')
    return out, r

def test_prepare_bar_knows_its_total_and_leaves_the_counts(slices):
    _, r = slices
    states = bar_states(r.stderr)
    assert states and states[0] == (0, SLICES), r.stderr   # the total before the first case is read
    assert {t for _, t in states} == {SLICES}, r.stderr     # never grows case by case
    assert r.stderr.splitlines()[-1] == f'prepare: {SLICES} slices of 3 cases: {SLICES} written, 0 already there'

def test_prepare_resumed_counts_only_missing_slices(src, tmp_path):
    out = tmp_path/'slices'
    run('prepare', src, out, '-q')
    (out/'manifest.csv').unlink()
    for name in ('images/volume-0_0003.jpg', 'masks/7_0005.png'): (out/name).unlink()
    r = run('prepare', src, out)
    assert {t for _, t in bar_states(r.stderr)} == {2}, r.stderr
    assert r.stderr.splitlines()[-1] == f'prepare: {SLICES} slices of 3 cases: 2 written, {SLICES - 2} already there'

def test_prepare_quiet_is_silent(src, tmp_path):
    r = run('prepare', src, tmp_path/'slices', '-q')
    assert r.stderr == '' and r.stdout.count('\n') == 1

def test_train_table_in_a_pipe(slices, tmp_path):
    "No bars and no '█' when stdout is a pipe; one short line per epoch; history.csv keeps every column"
    r = run('train', slices[0], '--out', tmp_path/'model', *FAST, '--epochs', 2)
    assert '█' not in r.stdout and '\r' not in r.stdout
    lines = r.stdout.splitlines()
    assert lines[-1] == f"model folder: {tmp_path/'model'}"
    assert lines[0] == 'plan light (fp32 on the cpu): epochs=2, coarse_epochs=4, last_cross=False, half_decoder=True, synth_lesions=0.5', r.stdout  # fp32 on a CPU: the light plan, the given options in it
    assert lines[1] == 'coarse stage: whole slices at 64 px, 4 epochs', r.stdout   # coarse to fine: two tables, each named
    fine = next(i for i, l in enumerate(lines) if l.startswith('fine stage: '))
    assert fine == 2 + 1 + 4 and lines[fine].startswith("fine stage: the liver's box at"), r.stdout
    table = lines[fine + 1:-1]
    assert len(table) == 1 + 2, r.stdout                   # the header and one line per epoch
    assert all(len(l) <= 100 for l in table), r.stdout
    header = table[0].split()
    assert header[0] == 'epoch' and {'train_loss', 'valid_loss', 'liver_dice', 'tumor_dice'} <= set(header)
    assert [l.split()[0] for l in table[1:]] == ['0', '1']
    assert all(len(l.split()) == len(header) for l in table[1:])
    hist = pd.read_csv(tmp_path/'model'/'history.csv')
    assert {'foreground_acc', 'dice_mean', 'liver_iou', 'tumor_iou', 'liver_precision', 'tumor_recall', 'time'} <= set(hist.columns)
    assert hist.epoch.tolist() == [0, 1]
