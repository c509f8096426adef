"""``megatron-grin pretrain``: check every flag first (no megatron-core import), then train.

Parsing and validation stay light, so a bad command line is answered in about a second; megatron-core,
torch.distributed and the model load only for a configuration that passed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Optional

from megatron_grin.config import ConfigError
from megatron_grin.training.arguments import PROG, parse_args


def setup_logging() -> None:
    """Our INFO lines on rank 0; megatron's and torch's chatter only from WARNING up."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s grin r{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("megatron", "torch.distributed", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "TE/Apex not installed, falling back to torch" (CPU and plain-torch installs)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``megatron-grin pretrain``; returns the exit status (2 for bad flags)."""
    start = time.time()
    setup_logging()
    try:
        cfg, tcfg = parse_args(argv)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    from megatron_grin.training.trainer import run  # lazy dispatch: megatron-core loads only for a valid run

    return run(cfg, tcfg, start)


if __name__ == "__main__":
    sys.exit(main())
