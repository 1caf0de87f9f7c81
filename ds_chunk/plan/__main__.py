"""``python -m ds_chunk.plan``: the memory breakdown and chunk-size recommendation, or ``--check CSV``."""

import sys

from ds_chunk.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
