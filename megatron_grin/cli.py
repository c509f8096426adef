"""``megatron-grin``: one console script, one subcommand per job; each module is imported only when used.

    megatron-grin pretrain --config local                  # megatron_grin.training.trainer
    megatron-grin preprocess --input a.jsonl --output-prefix data/a --tokenizer byte
    megatron-grin convert to-hf --load CKPT --out HF_DIR
    megatron-grin plan --config cluster/h100x64
    megatron-grin bench ...
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional, Sequence

#: subcommand -> (module, function, one-line help)
COMMANDS = {
    "pretrain": ("megatron_grin.training.pretrain", "main", "train a GRIN MoE (Megatron-LM flags; docs/training.md)"),
    "preprocess": ("megatron_grin.training.preprocess", "main", "tokenize text into a megatron indexed dataset"),
    "convert": ("megatron_grin.convert.cli", "main", "convert checkpoints to and from Hugging Face"),
    "plan": ("megatron_grin.plan.cli", "main", "memory and throughput plan for a cluster layout"),
    "bench": ("megatron_grin.bench.cli", "main", "micro-benchmarks"),
}


def quiet_missing_extras() -> None:
    """Drop megatron's "Transformer Engine / Apex not installed, falling back to torch" warnings (plain-torch and
    CPU installs say so once per module); every other warning still shows."""
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*", category=UserWarning)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: megatron-grin COMMAND [flags]   (megatron-grin COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from megatron_grin import __version__

        print(f"megatron-grin {__version__}")
        return 0
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"megatron-grin: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[name]
    quiet_missing_extras()  # before the import: megatron warns while its modules load
    module = importlib.import_module(module_name)
    sys.argv = [f"megatron-grin {name}", *rest]
    result = getattr(module, function)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
