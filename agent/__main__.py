"""`python -m agent` is the same as the `mqtt-agent` console script."""

import sys

from agent.cli import main

sys.exit(main())
