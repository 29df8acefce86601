"Run the `liver-seg` command line as `python -m liver_seg`"
import sys
from liver_seg.cli import main

if __name__ == "__main__": sys.exit(main())
