"""`python -m images`: see images/cli.py."""

import sys

from images.cli import main

sys.exit(main())
