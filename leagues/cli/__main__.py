"""`python -m leagues.cli` runs the `leagues` command."""

import sys

from leagues.cli.main import main

sys.exit(main())
