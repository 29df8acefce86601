"""A coarse stage trained another way, swapped into a copy of a trained coarse-to-fine model and scored on held-out CT.

    python bench/coarse_swap.py MODEL --work W [--every 2] [--epochs 4] [--size 64]
                                [--ircadb ../shared/data/ircadb-hu --ircadb-holdout 3Dircadb1.1]

The fine stage trains on true liver boxes, so a coarse stage can be changed without training the fine one again. The
coarse stage is retrained with MODEL/coarse/config.json's recipe (its data folders, seed, validation cases, checkpoint
rule, precision), changed only where an option says so, into W/coarse; MODEL is copied to W/model (without its cached
graphs) with that coarse stage in it, and `bench/accuracy_real.py --model W/model` scores it. Prints the coarse fit
time and kept epoch against the original's, then the held-out Dice. MODEL is never changed; W is replaced. Everything
stays outside the repository (data and models made from it must never be copied in). Results: bench/RESULTS.md.
"""
import argparse, json, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from cpuflags import cpu_summary  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('model', help='a trained coarse-to-fine model folder (with coarse/)')
    p.add_argument('--work', required=True, help='working folder outside the repository (replaced)')
    p.add_argument('--every', type=int, default=None, help='train the coarse stage on every n-th slice of each case')
    p.add_argument('--epochs', type=int, default=None, help='coarse epochs')
    p.add_argument('--size', type=int, default=None, help='coarse slice size')
    p.add_argument('--ircadb', default=None, help='IRCADb cases in HU (passed to accuracy_real.py)')
    p.add_argument('--ircadb-holdout', default='3Dircadb1.1')
    a = p.parse_args()
    model, work = Path(a.model).resolve(), Path(a.work).resolve()
    if work == ROOT or ROOT in work.parents: sys.exit(f"{work}: inside the repository; use a folder outside it")
    cfg = json.loads((model/'coarse'/'config.json').read_text())
    rec, split = cfg['recipe'], cfg['split']
    change = {k: v for k, v in (('every', a.every), ('epochs', a.epochs), ('size', a.size)) if v is not None}
    print(cpu_summary(), flush=True)
    print(f"coarse stage of {model}: {rec['epochs']} epochs at {cfg['size']} px, every {rec.get('every', 1)}; retrained with {change}", flush=True)
    if work.exists(): shutil.rmtree(work)
    work.mkdir(parents=True)
    from liver_seg.train import train
    opts = {'size': cfg['size'], 'epochs': rec['epochs'], 'every': rec.get('every', 1), **change}
    t0 = time.time()
    train(rec['data'], work/'coarse', cascade=False, valid_cases=split['valid_cases'], pretrained=False, precision=rec['precision'],
          seed=rec['seed'], monitor=rec['monitor'], lr=rec['lr'], bs=rec['bs'], loss=rec['loss'], flip=rec['flip'],
          augment=rec['augment'], context=rec['context'], progress=False, force=True, **opts)
    new = json.loads((work/'coarse'/'config.json').read_text())['recipe']
    print(f"coarse fit {new['train_seconds']:.0f} s (original {rec['train_seconds']:.0f} s), kept epoch {new['best_epoch']} "
          f"(original {rec['best_epoch']}), {new['n_train']} training slices (original {rec['n_train']}); wall {time.time() - t0:.0f} s", flush=True)
    shutil.copytree(model, work/'model', ignore=shutil.ignore_patterns('.engine'))
    shutil.rmtree(work/'model'/'coarse')
    shutil.copytree(work/'coarse', work/'model'/'coarse')
    cmd = [sys.executable, str(ROOT/'bench'/'accuracy_real.py'), '--model', str(work/'model'), '--work', str(work/'accuracy')]
    if a.ircadb: cmd += ['--ircadb', a.ircadb, '--ircadb-holdout', a.ircadb_holdout]
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == '__main__': main()
