"""``python -m spp_peft.estimate ...``: the same command as ``spp-peft estimate``."""

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
