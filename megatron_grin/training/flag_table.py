"""Megatron-LM 0.16's flags as data, and megatron-grin's answer to each one.

``megatron_lm_flags.json`` holds the facts (every flag of Megatron-LM's pretraining parser: spellings, dest,
group, kind, type, default, choices, help). A flag is *honoured* when a setting declared in config.py or
training/run_config.py (or a shorthand in arguments.py) owns one of its spellings; otherwise
``megatron_lm_answers.yaml`` says which value equals megatron-grin's behaviour (a logged no-op) and why
other values are refused. Reading both takes milliseconds and imports nothing heavy.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS_FILE = os.path.join(HERE, "megatron_lm_flags.json")
ANSWERS_FILE = os.path.join(HERE, "megatron_lm_answers.yaml")
_TYPES = {"int": int, "float": float, "str": str, None: str}


@dataclass(frozen=True)
class Answer:
    """What megatron-grin does with a Megatron-LM flag it does not honour through a setting."""

    ours: Any  # the value that equals megatron-grin's behaviour
    same: tuple = ()  # further values that equal it
    any_note: Optional[str] = None  # every value is a no-op, because ...
    reason: Optional[str] = None  # why other values are refused
    note: Optional[str] = None  # logged when a no-op value is given
    fixed: bool = False  # a GRIN property whose Megatron-LM default differs: must be given without a GRIN config
    passthrough: Optional[str] = None  # TransformerConfig field set to the given value (honoured)


@dataclass(frozen=True)
class MegatronFlag:
    """One entry of Megatron-LM's parser."""

    flags: tuple[str, ...]
    dest: str
    group: str
    kind: str  # value | store_true | store_false | list
    type: Optional[str]
    default: Any
    choices: Optional[tuple]
    nargs: Optional[str]
    help: str
    answer: Optional[Answer]  # None when a declared setting honours the flag

    @property
    def name(self) -> str:
        return self.flags[0]

    def takes_values(self) -> bool:
        return self.kind in ("value", "list")

    def convert(self, tokens: list[str]) -> Any:
        """Tokens -> value as Megatron-LM's parser would produce it (ValueError if it would refuse them)."""
        if self.kind == "store_true":
            return True
        if self.kind == "store_false":
            return False
        typ = _TYPES.get(self.type, str)
        out = []
        for token in tokens:
            try:
                value = typ(token)
            except ValueError:
                raise ValueError(f"{self.name} {token!r}: expected {'an integer' if typ is int else 'a number'}") \
                    from None
            if self.choices and value not in self.choices and str(value) not in map(str, self.choices):
                raise ValueError(f"{self.name} {token!r}: Megatron-LM accepts {', '.join(map(str, self.choices))}")
            out.append(value)
        return out if self.kind == "list" else out[0]

    def judge(self, value: Any) -> tuple[bool, str]:
        """(accepted, text): a no-op note, or the reason a value is refused."""
        a = self.answer
        if a is None or a.passthrough:
            return True, ""
        if a.any_note is not None:
            return True, a.any_note
        if _same(value, a.ours) or any(_same(value, s) for s in a.same):
            return True, a.note or "megatron-grin already behaves this way"
        return False, a.reason or "not supported"


def _same(value: Any, reference: Any) -> bool:
    if isinstance(value, list) and len(value) == 1 and not isinstance(reference, list):
        value = value[0]
    if value == reference:
        return True
    try:
        return float(value) == float(reference)
    except (TypeError, ValueError):
        return str(value).strip() == str(reference).strip()


def _load_yaml(path: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)


def _answer(spec: Any, default: Any, reasons: dict) -> Answer:
    if isinstance(spec, str):
        return Answer(ours=default, reason=reasons.get(spec, spec))
    ours = spec.get("ours", default)
    reason = spec.get("reason")
    return Answer(ours=ours, same=tuple(spec.get("same", ())), any_note=spec.get("any"),
                  reason=reasons.get(reason, reason) if reason else None, note=spec.get("note"),
                  fixed=bool(spec.get("fixed")), passthrough=spec.get("passthrough"))


@functools.lru_cache(maxsize=4)
def load(honoured: frozenset = frozenset()) -> tuple[MegatronFlag, ...]:
    """Every Megatron-LM flag, with its answer; ``honoured`` = option strings our declared settings own."""
    entries = _entries()
    data = _load_yaml(ANSWERS_FILE)
    reasons, groups, answers = data["reasons"], data["groups"], data["flags"]
    out = []
    for e in entries:
        key = e["flags"][0][2:]
        if honoured & set(e["flags"]):
            answer = None
        elif key in answers:
            answer = _answer(answers[key], e["default"], reasons)
        elif e["group"] in groups:
            answer = _answer(groups[e["group"]], e["default"], reasons)
        else:  # tests/training/test_arguments.py makes sure this never happens
            answer = Answer(ours=e["default"], reason="not supported by megatron-grin")
        out.append(MegatronFlag(flags=tuple(e["flags"]), dest=e["dest"], group=e["group"], kind=e["kind"],
                                type=e["type"], default=e["default"],
                                choices=tuple(e["choices"]) if e["choices"] else None, nargs=e["nargs"],
                                help=e["help"], answer=answer))
    return tuple(out)


def _entries() -> list[dict]:
    """Megatron-LM's parser, then the flags pretrain_gpt.py's extra_args_provider adds (modelopt)."""
    with open(FLAGS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return data["flags"] + data.get("extensions", [])


def unanswered(honoured: frozenset) -> list[str]:
    """Flags neither honoured nor answered by the YAML file (must be empty)."""
    entries = _entries()
    data = _load_yaml(ANSWERS_FILE)
    return [e["flags"][0] for e in entries
            if not honoured & set(e["flags"]) and e["flags"][0][2:] not in data["flags"]
            and e["group"] not in data["groups"]]


def stale_answers(honoured: frozenset) -> list[str]:
    """Answers for flags Megatron-LM does not have or that a setting honours (must be empty)."""
    entries = {e["flags"][0][2:]: e for e in _entries()}
    data = _load_yaml(ANSWERS_FILE)
    bad = [k for k in data["flags"] if k not in entries or honoured & set(entries[k]["flags"])]
    reasons = data["reasons"]
    for k, v in list(data["flags"].items()) + list(data["groups"].items()):
        reason = v.get("reason") if isinstance(v, dict) else v
        if isinstance(reason, str) and " " not in reason and reason not in reasons:
            bad.append(f"{k}: unknown reason key {reason!r}")
    return bad
