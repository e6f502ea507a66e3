"""``python -m trainer`` (what torchrun runs): same as ``ddpo-train``."""

import sys

from trainer.cli import main

sys.exit(main())
