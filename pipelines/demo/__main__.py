"""`python -m pipelines.demo build ...`: rebuild the demo models (see build.py)."""

import sys

from .build import main

sys.exit(main())
