"""``python -m equiforce`` = the ``equiforce`` command."""

import sys

from equiforce.cli import main

sys.exit(main())
