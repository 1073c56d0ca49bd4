"""``python -m robkd`` (also what ``torchrun -m robkd`` runs)."""

import sys

from robkd.cli.main import main

sys.exit(main())
