"""``python -m spp_peft.cli``: the same as the ``spp-peft`` command."""

import sys

from spp_peft.cli import main

sys.exit(main())
