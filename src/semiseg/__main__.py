"""`python -m semiseg ...`: the `semiseg` command where the package is on the path but not
installed (e.g. PYTHONPATH=src on a machine without the console script)."""

import sys

from semiseg.cli import main

sys.exit(main())
