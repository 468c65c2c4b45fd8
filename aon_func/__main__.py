"""``python -m aon_func``: the same as the ``aon-func`` command."""

import sys

from ._cli import main

sys.exit(main())
