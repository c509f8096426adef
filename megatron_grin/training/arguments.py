"""Flags of ``megatron-grin pretrain``: Megatron-LM's names, every problem reported at once, no heavy imports.

    parsed = parse(["--config", "local", "--train-iters", "200", "--mock-data"])
    cfg, tcfg = parse_args([...])                      # the validated (GrinConfig, TrainConfig)

The flags come from the declarations (config.GrinConfig, run_config.TrainConfig, :class:`CommandOptions`)
and from Megatron-LM 0.16's own parser (flag_table.py): every Megatron-LM flag is honoured, accepted as a
logged no-op, or refused with its reason. Precedence, lowest first: defaults (Megatron-LM's, or a GRIN preset's
when ``--model-preset`` / a GRIN config names one) < ``--config FILE.yaml`` < flags. YAML keys are flag names
with dashes or underscores. One run reports every unknown flag, bad value and contradiction, each with its fix.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from megatron_grin.config import PRESETS, ConfigError, GrinConfig
from megatron_grin.settings import GRIN_GROUP, Setting, declared, field_default, optional_int, setting
from megatron_grin.training import flag_table, resolve, run_checks
from megatron_grin.training.flag_table import MegatronFlag
from megatron_grin.training.resolve import get
from megatron_grin.training.run_config import TrainConfig

PROG = "megatron-grin pretrain"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
#: names some tools use for a Megatron-LM flag: suggested, never accepted
SYNONYMS = {"--tp": "--tensor-model-parallel-size", "--pp": "--pipeline-model-parallel-size",
            "--vpp": "--num-virtual-stages-per-pipeline-rank", "--ep": "--expert-model-parallel-size",
            "--cp": "--context-parallel-size", "--etp": "--expert-tensor-parallel-size",
            "--distributed-optimizer": "--use-distributed-optimizer", "--recompute": "--recompute-granularity",
            "--dtype": "--bf16", "--topk": "--moe-router-topk", "--moe-topk": "--moe-router-topk",
            "--experts": "--num-experts", "--hidden": "--hidden-size", "--ffn": "--moe-ffn-hidden-size",
            "--layers": "--num-layers", "--heads": "--num-attention-heads", "--vocab": "--vocab-size",
            "--iteration": "--ckpt-step", "--max-seq-len": "--seq-length", "--seq-len": "--seq-length",
            "--gbs": "--global-batch-size", "--mbs": "--micro-batch-size", "--grin-sliding-window": "--window-size",
            "--preset": "--model-preset", "--gpus": "WORLD_SIZE (torchrun) or SLURM_NTASKS"}


@dataclass
class CommandOptions:
    """Flags of the command itself, and Megatron-LM shorthands that fill a declared setting."""

    config: Optional[str] = setting(None, "--config", help="YAML file of flag values (keys = flag names), or a "
                                    "packaged config by name: " + ", ".join(
                                        sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml")))
                                    if os.path.isdir(CONFIG_DIR) else "YAML file of flag values", group=GRIN_GROUP,
                                    metavar="NAME|FILE.yaml")
    model_preset: Optional[str] = setting(None, "--model-preset", help="GRIN architecture preset (its defaults "
                                          "replace Megatron-LM's)", group=GRIN_GROUP, choices=tuple(sorted(PRESETS)))
    dry_run: bool = setting(False, "--dry-run", help="check everything, print the resolved model and run, start "
                            "nothing", group=GRIN_GROUP, kind="flag")
    ffn_hidden_size: Optional[int] = setting(None, "--ffn-hidden-size", help="Megatron-LM's dense FFN size; the "
                                             "expert size when --moe-ffn-hidden-size is not given",
                                             group="transformer configuration", type=int, ge=1)
    group_query_attention: bool = setting(False, "--group-query-attention", help="use --num-query-groups key/value "
                                          "heads (else one per query head)", group="network size", kind="flag")
    num_layers_per_virtual_pipeline_stage: Optional[int] = setting(
        None, "--num-layers-per-virtual-pipeline-stage", help="layers per virtual stage (interleaved 1F1B)",
        group="distributed", type=int, ge=1)
    use_flash_attn: bool = setting(False, "--use-flash-attn", help="= --attention-backend flash", group="training",
                                   kind="flag")
    recompute_activations: bool = setting(False, "--recompute-activations", help="= --recompute-granularity "
                                          "selective", group="training", kind="flag")
    sliding_window: Optional[int] = setting(None, "--sliding-window", help="GRIN's window in the HF convention "
                                            "(N keys incl. the query; = --window-size N-1,0); none", group=GRIN_GROUP,
                                            type=optional_int, ge=1, metavar="N|none")


#: declared dataclasses and the key prefix of their values
OWNERS = (("model", GrinConfig), ("train", TrainConfig), ("cli", CommandOptions))


@dataclass(frozen=True)
class Target:
    """What one option string sets."""

    key: str  # "model.hidden_size", "train.lr", "cli.config" or "megatron.--fp16"
    setting: Optional[Setting] = None
    mflag: Optional[MegatronFlag] = None
    implied: Any = None  # the value of a spelling that takes no value (--x / --no-x)

    @property
    def nargs(self) -> Any:
        """0, 1, "+" or an int: how many tokens follow."""
        if self.setting is not None:
            if self.setting.kind != "value":
                return 0
            return self.setting.nargs or 1
        if not self.mflag.takes_values():
            return 0
        return int(self.mflag.nargs) if str(self.mflag.nargs).isdigit() else (self.mflag.nargs or 1)

    def convert(self, tokens: list[str]) -> Any:
        if self.nargs == 0:
            return self.implied
        if self.setting is not None:
            return self.setting.convert(tokens)
        return self.mflag.convert(tokens)


@dataclass
class Given:
    """A value from the command line or the config file, and where it came from (for messages)."""

    value: Any
    origin: str  # "--lr" or "run.yaml: lr"


@dataclass
class Scan:
    values: dict = field(default_factory=dict)  # key -> Given (last occurrence wins, as argparse)
    counts: dict = field(default_factory=dict)  # key -> occurrences
    problems: list = field(default_factory=list)
    help: bool = False


def _declared_targets() -> dict[str, Target]:
    index: dict[str, Target] = {}
    for prefix, cls in OWNERS:
        for name, s in declared(cls):
            key = f"{prefix}.{name}"
            for flag in s.flags:
                implied = {"flag": True, "off": False, "switch": True}.get(s.kind)
                index[flag] = Target(key, setting=s, implied=implied)
                if s.kind == "switch":
                    index["--no-" + flag[2:]] = Target(key, setting=s, implied=False)
    return index


def targets() -> dict[str, Target]:
    """Every option string ``pretrain`` answers: declared settings first, then Megatron-LM's other flags."""
    index = _declared_targets()
    for m in megatron_flags():
        for flag in m.flags:
            index.setdefault(flag, Target(f"megatron.{m.name}", mflag=m, implied=m.kind == "store_true"))
    return index


def megatron_flags() -> tuple[MegatronFlag, ...]:
    return flag_table.load(frozenset(_declared_targets()))


def known_flags(parser: Optional[argparse.ArgumentParser] = None) -> list[str]:
    if parser is not None:
        return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))
    return sorted(targets())


# --- unknown flags: suggestions only between related names ---------------------------------------------------
def suggestion(flag: str, known: Sequence[str]) -> str:
    """'; did you mean X?' for a misspelt flag, only when X shares its leading word (or is a known synonym)."""
    if flag in SYNONYMS:
        return f"; megatron-grin uses Megatron-LM's name: {SYNONYMS[flag]}"
    head = flag[2:].split("-")[0]
    related = [k for k in known if k[2:].split("-")[0] == head]
    close = difflib.get_close_matches(flag, related, n=1, cutoff=0.75)
    if not close:
        longer = [k for k in related if k.startswith(flag + "-")]
        close = longer if len(longer) == 1 else []
    return f"; did you mean {close[0]}?" if close else ""


def unknown_flags(parser_or_known: Any, argv: Sequence[str]) -> list[tuple[str, str]]:
    """Flags in argv (up to ``--``) that are not known, each with a related suggestion (or "")."""
    known = known_flags(parser_or_known) if isinstance(parser_or_known, argparse.ArgumentParser) \
        else list(parser_or_known)
    known_set = set(known)
    found = []
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known_set:
            found.append((flag, suggestion(flag, known)))
    return found


# --- the command line -----------------------------------------------------------------------------------------
def _is_flag(token: str) -> bool:
    return token.startswith("--") or (token.startswith("-") and len(token) > 1 and token[1].isalpha())


def scan(argv: Sequence[str], index: Optional[dict] = None) -> Scan:
    """Command-line tokens -> values, with a problem for every unknown flag, missing or bad value."""
    index = index or targets()
    out = Scan()
    known = list(index)
    i, argv = 0, list(argv)
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            out.help = True
            continue
        if not _is_flag(token):
            out.problems.append(f"{token!r}: unexpected value (no flag before it takes one)")
            continue
        flag, _, inline = token.partition("=")
        target = index.get(flag)
        if target is None:
            out.problems.append(f"{flag}: unknown flag (neither megatron-grin nor Megatron-LM 0.16 has it)"
                                + suggestion(flag, known))
            while i < len(argv) and not _is_flag(argv[i]):  # its values
                i += 1
            continue
        tokens, i, problem = _take_values(flag, target.nargs, inline if "=" in token else None, argv, i)
        if problem:
            out.problems.append(problem)
            continue
        try:
            value = target.convert(tokens)
        except ValueError as err:
            out.problems.append(str(err))
            continue
        bad = target.setting.check(value) if target.setting is not None else None
        if bad:
            out.problems.append(bad)
            continue
        out.values[target.key] = Given(value, flag if tokens == [] else f"{flag} {' '.join(tokens)}")
        out.counts[target.key] = out.counts.get(target.key, 0) + 1
    return out


def _take_values(flag: str, nargs: Any, inline: Optional[str], argv: list, i: int) -> tuple[list, int, str]:
    if nargs == 0:
        return [], i, (f"{flag} takes no value (got {inline!r})" if inline is not None else "")
    if inline is not None:
        return [inline], i, ""
    taken = []
    while i < len(argv) and not _is_flag(argv[i]) and (nargs in ("+", "*") or len(taken) < (nargs or 1)):
        taken.append(argv[i])
        i += 1
    want = 1 if nargs in (1, "+") else (0 if nargs == "*" else nargs)
    if len(taken) < want:
        return taken, i, f"{flag} expects {'a value' if want == 1 else f'{want} values'}"
    return taken, i, ""


# --- the config file -----------------------------------------------------------------------------------------
def config_path(name: str) -> str:
    """A YAML path, or the name of a config shipped in the package (megatron_grin/configs/NAME.yaml)."""
    if os.path.isfile(name):
        return name
    packaged = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if not os.path.isabs(name) and os.path.isfile(packaged):
        return packaged
    shipped = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError(f"--config {name}: no such file, and not a packaged config ({', '.join(shipped)})")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (PyYAML itself silently keeps the last value)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: a config must say each value once."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if line != key_node.start_mark.line + 1:
                raise DuplicateKeyError(None, None, f"key {key!r} given twice (lines {line} and "
                                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> dict:
    """A config file's mapping; every reader of megatron-grin's YAML configs (pretrain, plan) goes through here."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=UniqueKeyLoader)
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file "
                          "as UTF-8") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"--config {path}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return data


def _yaml_tokens(value: Any, nargs: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, bool):
        return [str(value).lower()]
    return str(value).split() if nargs in ("+", "*") else [str(value)]


def scan_mapping(data: dict, origin: str, index: Optional[dict] = None) -> Scan:
    """YAML keys (flag names, dashes or underscores) -> values, typed exactly as the same flags would be."""
    index = index or targets()
    out = Scan()
    known = list(index)
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        target = index.get(flag) or index.get("--" + str(key))
        where = f"{origin}: {key}"
        if target is None or target.key == "cli.config":
            hint = suggestion(flag, known) if target is None else "; a config file cannot name another"
            out.problems.append(f"{where}: unknown key{hint}")
            continue
        if value is None:
            continue
        try:
            given = _yaml_value(target, flag, value)
        except ValueError as err:
            out.problems.append(f"{where}: {err}")
            continue
        bad = target.setting.check(given) if target.setting is not None and given is not None else None
        if bad:
            out.problems.append(f"{where}: {bad}")
            continue
        if given is not None:
            out.values[target.key] = Given(given, where)
    return out


def _yaml_value(target: Target, flag: str, value: Any) -> Any:
    if target.nargs == 0:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false (got {value!r})")
        if target.setting is not None and target.setting.kind == "switch":
            return value if target.implied else not value
        return target.implied if value else None  # `false` for a store_true flag = not given
    if isinstance(value, dict):
        raise ValueError("takes a value, not a mapping")
    if isinstance(value, (list, tuple)) and target.nargs == 1:
        raise ValueError("takes one value, not a list")
    return target.convert(_yaml_tokens(value, target.nargs))


# --- the parse ---------------------------------------------------------------------------------------------------
@dataclass
class Parsed:
    """A validated configuration, and the lines ``pretrain`` logs about how Megatron-LM flags were taken."""

    cfg: GrinConfig
    tcfg: TrainConfig
    notes: list
    dry_run: bool = False
    config_file: Optional[str] = None
    model_source: str = ""
    exit_missing: bool = False  # --exit-on-missing-checkpoint and nothing to load: exit 0 (as Megatron-LM)


def launcher_ranks(env: Optional[dict] = None) -> tuple[int, int]:
    """(rank, world size) the launcher announced (torchrun's RANK / WORLD_SIZE, else Slurm's SLURM_PROCID /
    SLURM_NTASKS), else (0, 1). Raises ConfigError naming a variable that is not a valid count or rank."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS")
    else:
        return 0, 1
    rank_name, world_name = names
    world = _env_int(env, world_name, "1")
    if world is None or world < 1:
        raise ConfigError(f"environment variable {world_name}={env[world_name]!r}: must be a positive integer "
                          "(the number of ranks; for a dry run of an N-rank job: WORLD_SIZE=N)")
    rank = _env_int(env, rank_name, "0")
    if rank is None or not 0 <= rank < world:
        raise ConfigError(f"environment variable {rank_name}={env[rank_name]!r}: must be a non-negative integer "
                          f"below {world_name}={world}")
    return rank, world


def _env_int(env: dict, name: str, default: str) -> Optional[int]:
    text = env.get(name, default).strip()
    return int(text) if text.lstrip("-").isdecimal() else None  # not int(): it takes "1_0" and "+1"


def world_size_from_env(env: Optional[dict] = None) -> int:
    """World size the launcher announced (see :func:`launcher_ranks`), else 1."""
    return launcher_ranks(env)[1]


def gather(argv: Sequence[str]) -> tuple[dict, list, Optional[str], bool]:
    """(values, problems, config file, --help asked) of a command line and its --config file."""
    index = targets()
    cli = scan(argv, index)
    problems = list(cli.problems)
    config = cli.values.get("cli.config")
    if cli.counts.get("cli.config", 0) > 1:
        problems.append("--config given more than once: pass one file (flags on the command line override it)")
    values, path = {}, None
    if config is not None:
        try:
            path = config_path(config.value)
            from_file = scan_mapping(read_yaml(path), os.path.basename(path), index)
            values.update(from_file.values)
            problems += from_file.problems
        except ConfigError as err:
            problems += err.problems
    values.update(cli.values)
    return values, problems, path, cli.help


def parse(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None, check: bool = True) -> Parsed:
    """Flags (+ --config YAML) -> validated Parsed; raises ConfigError listing every problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, problems, path, _ = gather(argv)
    world = world_size_from_env() if world_size is None else world_size
    result = resolve.resolve(values, world, megatron_flags())
    problems += result.problems
    if check:
        problems += run_checks.light(result)
    if problems:
        raise ConfigError(_dedupe(problems))
    dry = bool(get(values, "cli.dry_run"))
    if check and run_checks.missing_checkpoint(result.tcfg):
        return Parsed(result.cfg, result.tcfg, result.notes, dry_run=dry, config_file=path, exit_missing=True)
    if check:
        heavy = run_checks.heavy(result)
        if heavy:
            raise ConfigError(_dedupe(heavy))
    return Parsed(result.cfg, result.tcfg, result.notes, dry_run=dry, config_file=path,
                  model_source=result.model_source)


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               check: bool = True) -> tuple[GrinConfig, TrainConfig]:
    """Flags (+ --config YAML) -> validated (GrinConfig, TrainConfig). Raises ConfigError."""
    parsed = parse(argv, world_size, check)
    return parsed.cfg, parsed.tcfg


def _dedupe(items: list[str]) -> list[str]:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


# --- --help --------------------------------------------------------------------------------------------------------
def _default_text(cls: type, name: str, s: Setting) -> str:
    value = field_default(cls, name)
    if s.kind in ("flag", "off"):
        return ""
    return f" (default: {'none' if value is None else value})"


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with every flag, grouped as Megatron-LM groups them (for --help and tools).

    Parsing itself goes through :func:`scan`, which reports every problem at once.
    """
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, add_help=True,
                                usage=f"{PROG} [--config NAME|FILE.yaml] [--dry-run] [Megatron-LM flags ...]",
                                description="Pretrain a GRIN MoE on megatron-core with Megatron-LM's flags. Every "
                                            "Megatron-LM 0.16 flag is honoured, accepted as a logged no-op, or "
                                            "refused with its reason (docs/training.md).")
    groups: dict[str, Any] = {}

    def group(title: str):
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        return groups[title]

    for prefix, cls in OWNERS:
        for name, s in declared(cls):
            kw: dict[str, Any] = dict(dest=f"{prefix}.{name}", help=s.help + _default_text(cls, name, s))
            if s.kind == "switch":
                kw.update(action=argparse.BooleanOptionalAction, default=None)
            elif s.kind in ("flag", "off"):
                kw.update(action="store_true")
            else:
                kw.update(metavar=s.metavar or (name.upper() if not s.choices else None), nargs=s.nargs,
                          choices=s.choices)
            group(s.group).add_argument(*s.flags, **kw)
    for m in megatron_flags():
        if m.answer is None:
            continue
        kw = dict(dest=f"megatron.{m.name}", help=_answer_text(m))
        if m.takes_values():
            kw.update(metavar="V", nargs=m.nargs if m.kind == "list" else None)
        else:
            kw.update(action="store_true")
        group(m.group).add_argument(*m.flags, **kw)
    return p


def _answer_text(m: MegatronFlag) -> str:
    a = m.answer
    if a.passthrough:
        return f"{m.help} (default: {m.default}; passed to megatron-core)"
    if a.any_note is not None:
        return f"accepted, no-op: {a.any_note}"
    ours = "set" if a.ours is True and not m.takes_values() else a.ours
    if m.kind == "store_true" and a.ours is False or (m.kind == "store_false" and a.ours is True):
        return f"refused: {a.reason}"
    return f"no-op at {ours}; other values refused: {a.reason}"
