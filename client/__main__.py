"""`python -m sdxl_client ...` is the sdxl command."""

import sys

from .cli import main

sys.exit(main())
