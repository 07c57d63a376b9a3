"""``python -m juggler``: the same as the ``juggler`` command."""

import sys

from .cli import main

sys.exit(main())
