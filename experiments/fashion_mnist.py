"""`python -m experiments.fashion_mnist --loss LOSS`: see `--help` and experiments/cli.py."""

import sys

from experiments.cli import main

if __name__ == "__main__":
    sys.exit(main("fashion_mnist"))
