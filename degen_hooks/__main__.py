"""``python -m degen_hooks``: the command line (see :mod:`degen_hooks.cli`)."""

import sys

from .cli import main

sys.exit(main())
