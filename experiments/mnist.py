"""`python -m experiments.mnist --loss LOSS`: see `--help` and experiments/driver.py."""

import sys

from experiments.driver import main

if __name__ == "__main__":
    sys.exit(main("mnist"))
