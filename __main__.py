"""`python -m swiftstep …` is the `swiftstep` command (also under `accelerate launch -m swiftstep …`)."""

import sys

from .cli import main

sys.exit(main())
