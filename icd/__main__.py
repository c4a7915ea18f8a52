"""``python -m icd ...`` (and ``torchrun -m icd train ...``): the ``icd`` command line."""

import sys

from icd.console import main

sys.exit(main())
