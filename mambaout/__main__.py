"""`python -m mambaout` runs the command line."""

import sys

from mambaout.cli import main

sys.exit(main())
