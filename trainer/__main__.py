"""`python -m trainer`: parse the flags, train, exit with the run's code (see trainer.cli)."""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
