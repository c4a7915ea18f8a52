"""``python -m icd ...`` (and ``torchrun -m icd train ...``): the ``icd`` command line."""

import sys

from icd.cli import main

sys.exit(main())
