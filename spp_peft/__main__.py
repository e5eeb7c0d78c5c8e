"""``python -m spp_peft ...`` is the ``spp-peft`` command (useful without the console script on PATH)."""

import sys

from spp_peft.cli import main

sys.exit(main())
