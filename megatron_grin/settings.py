"""A setting is declared once: flag names, default, one-line help, Megatron-LM group and range, beside its field.

``GrinConfig`` (config.py) and ``TrainConfig`` (training/run_config.py) declare each field with :func:`setting`.
The command-line scanner, the YAML reader, ``--help`` and the range checks of ``megatron-grin pretrain`` and
``plan`` are generated from these declarations, so adding a flag touches one place.

This module imports nothing from the package (it sits below ``config``) and nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

#: group title for flags Megatron-LM does not have
GRIN_GROUP = "GRIN"


@dataclass(frozen=True)
class Setting:
    """How one dataclass field appears on the command line and in YAML."""

    flags: tuple[str, ...]  # option strings; flags[0] is the one messages and --help use
    help: str
    group: str  # Megatron-LM's argparse group title, or GRIN_GROUP
    type: Callable[[str], Any] = str  # converts one token (raises ValueError with a readable message)
    kind: str = "value"  # value | flag (store_true) | off (store_false) | switch (--x and --no-x)
    nargs: Optional[str] = None  # "+" for a list of values
    choices: Optional[tuple] = None
    ge: Optional[float] = None  # allowed range, checked for every value
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    arch: bool = False  # part of the model's architecture: a preset or config defines it
    metavar: Optional[str] = None
    max_values: Optional[int] = None  # with nargs "+": Megatron-LM takes a list, megatron-grin this many (1: a scalar)

    @property
    def flag(self) -> str:
        return self.flags[0]

    def option_strings(self) -> list[str]:
        """Every spelling the scanner accepts (a switch also takes ``--no-<name>``)."""
        out = list(self.flags)
        if self.kind == "switch":
            out += ["--no-" + f[2:] for f in self.flags]
        return out

    def range_text(self) -> str:
        parts = []
        if self.ge is not None or self.gt is not None:
            parts.append(f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}")
        if self.le is not None or self.lt is not None:
            parts.append(f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}")
        return " and ".join(parts)

    def check(self, value: Any) -> Optional[str]:
        """A problem message if ``value`` (or an element of a list) is outside the declared range or choices."""
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or isinstance(v, bool):
                continue
            if self.choices is not None and v not in self.choices:
                return f"{self.flag} {v!r}: choose one of {', '.join(map(str, self.choices))}"
            if not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                return f"{self.flag} {v}: must be a finite number"
            if ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt)):
                return f"{self.flag} {_num(v)}: must be {self.range_text()}"
        return None

    def convert(self, tokens: list[str]) -> Any:
        """Command-line tokens -> the field's value (ValueError on a bad token)."""
        if self.nargs == "+":
            if self.max_values is not None and len(tokens) > self.max_values:
                raise ValueError(f"{self.flag} {' '.join(tokens)}: takes {self.max_values} value"
                                 f"{'s' if self.max_values > 1 else ''} here (every GRIN layer is the same MoE layer)")
            values = [_convert_one(self, t) for t in tokens]
            return values[0] if self.max_values == 1 else values
        return _convert_one(self, tokens[0])


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _convert_one(s: Setting, token: str) -> Any:
    try:
        return s.type(token)
    except (TypeError, ValueError) as err:
        detail = str(err) if s.type not in (int, float) else f"expected {'an integer' if s.type is int else 'a number'}"
        raise ValueError(f"{s.flag} {token!r}: {detail}") from None


def setting(default: Any, *flags: str, help: str, group: str, default_factory: Any = dataclasses.MISSING,
            **options: Any) -> Any:
    """A dataclass field declared with its flags (first = primary), help, Megatron-LM group and range."""
    meta = {"setting": Setting(flags=tuple(flags), help=help, group=group, **options)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls: type) -> Iterator[tuple[str, Setting]]:
    """(field name, Setting) for every declared field of a dataclass, in declaration order."""
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if s is not None:
            yield f.name, s


def field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def range_problems(obj: Any) -> list[str]:
    """Range and choice problems of every declared field of a dataclass instance."""
    out = []
    for name, s in declared(type(obj)):
        problem = s.check(getattr(obj, name))
        if problem:
            out.append(problem)
    return out


# --- token types shared by several settings -----------------------------------------------------------------
def optional_int(token: str) -> Optional[int]:
    """An int, or none/null for "not set"."""
    if token.strip().lower() in ("none", "null", ""):
        return None
    return int(token)


def boolean(token: str) -> bool:
    lowered = token.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def bounded(typ: Callable[[str], Any], ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None) -> Callable[[str], Any]:
    """An argparse ``type=`` converting with ``typ`` and checking the range (ValueError names the bound)."""
    checker = Setting(flags=("value",), help="", group="", type=typ, ge=ge, gt=gt, le=le, lt=lt)

    def convert(token: str) -> Any:
        try:
            value = typ(token)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{token!r}: expected {'an integer' if typ is int else 'a number'}") \
                from None
        if checker.check(value):
            raise argparse.ArgumentTypeError(f"{token}: must be {checker.range_text()}")
        return value

    convert.__name__ = f"{getattr(typ, '__name__', 'value')} {checker.range_text()}"
    return convert
