"""``python -m megatron_grin COMMAND ...`` == ``megatron-grin COMMAND ...`` (what torchrun -m runs)."""

import sys

from megatron_grin.cli import main

if __name__ == "__main__":
    sys.exit(main())
