"""`python -m sdxl_services STAGE ...`: run one stage process (see stage.py)."""

import sys

from .stage import main

sys.exit(main())
