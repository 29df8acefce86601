"Run the `liver-seg` command line as `python -m liver_seg`"
from liver_seg.cli import run

if __name__ == "__main__": run()
