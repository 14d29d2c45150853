"""`python -m csplade …` (also what `accelerate launch -m csplade …` runs)."""

import sys

from csplade.cli import main

sys.exit(main())
