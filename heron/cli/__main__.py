"""``python -m heron.cli``, the ``heron`` script without an installed entry point (how
heron.server.process and the tests start it)."""

import sys

from heron.cli import main

sys.exit(main())
