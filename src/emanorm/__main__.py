"""``python -m emanorm`` (and ``torchrun -m emanorm``) run the CLI."""

import sys

from emanorm.cli import main

sys.exit(main())
