"""`python -m training` (and `torchrun ... -m training`): the `twotower` command line, `training.cli.main`."""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
