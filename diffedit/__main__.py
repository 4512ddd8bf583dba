"""`python -m diffedit ...`: the same as the `diffedit` command."""

import sys

from .cli import main

sys.exit(main())
