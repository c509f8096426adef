"""``megatron-grin pretrain``: check every flag first (no megatron-core import), then train.

Parsing and validation stay light, so a bad command line is answered in well under two seconds with every
problem at once; megatron-core, torch.distributed and the model load only for a configuration that passed.
``--dry-run`` prints the resolved model and run instead of starting; ``--help`` lists every flag.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from megatron_grin.cli import quiet_missing_extras
from megatron_grin.config import ConfigError
from megatron_grin.training.arguments import PROG, build_parser, launcher_ranks, parse
from megatron_grin.training import preflight
from megatron_grin.training.dry_run import report

log = logging.getLogger("megatron_grin.training.pretrain")


def setup_logging(rank: int) -> None:
    """Our INFO lines on rank 0; megatron's and torch's chatter only from WARNING up."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s grin r{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("megatron", "torch.distributed", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_missing_extras()


def print_problems(problems: list[str]) -> None:
    head = "error" if len(problems) == 1 else f"{len(problems)} problems"
    lines = [f"{PROG}: {head}:"] + [f"  - {p}" for p in problems]
    print("\n".join(lines), file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``megatron-grin pretrain``; returns the exit status (2 for bad flags)."""
    start = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        try:
            print(build_parser().format_help())
        except BrokenPipeError:  # `--help | head`
            sys.stderr.close()
        return 0
    try:
        setup_logging(launcher_ranks()[0])
        parsed = parse(argv)
    except ConfigError as err:
        print_problems(err.problems)
        return 2
    if parsed.exit_missing:
        print(f">> '--exit-on-missing-checkpoint' set: --load {parsed.tcfg.load} holds no checkpoint, exiting. <<")
        return 0
    if parsed.dry_run:
        problems = preflight.problems(parsed.cfg, parsed.tcfg, preflight.split_sizes(parsed.tcfg), create=False)
        if problems:
            print_problems(problems)
            return 2
        print(report(parsed))
        return 0
    for note in parsed.notes:
        log.info("%s", note)
    from megatron_grin.training.trainer import run  # lazy dispatch: megatron-core loads only for a valid run

    return run(parsed.cfg, parsed.tcfg, start)


if __name__ == "__main__":
    sys.exit(main())
