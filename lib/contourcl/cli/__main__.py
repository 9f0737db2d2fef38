"""``python -m contourcl.cli``: the ``contourcl`` command (``torchrun ... -m contourcl.cli`` runs it this way)."""

import sys

from contourcl.cli import main

sys.exit(main())
