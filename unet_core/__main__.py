"""``python -m unet_core STAGE ...``: the ``unet`` command without its console script, e.g. on a
node where the repository is only on ``PYTHONPATH`` (not installed)."""

import sys

from unet_core.cli import main

sys.exit(main())
