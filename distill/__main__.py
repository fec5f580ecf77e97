"""``python -m distill`` (and ``torchrun -m distill``): the ``distill`` command line."""
import sys

from distill.cli import main

sys.exit(main())
