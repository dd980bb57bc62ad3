"""``python -m pipeline`` (also what ``torchrun -m pipeline`` starts)."""

import sys

from pipeline.cli import main

sys.exit(main())
