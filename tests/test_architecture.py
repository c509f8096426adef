"""The package's import rules (docs/architecture.md), read from the source with ``ast``: no import is executed.

* base modules (config, settings, compat, accounting, ckpt_format, ckpt_integrity) import no subpackage of
  megatron_grin, except leaf ops (ops/ modules that import nothing from megatron_grin, e.g. ops/cpu_gemm.py);
* ops/ imports nothing from model/ but the references it mirrors (model.sparsemixer, model.routing_rng),
  and no megatron-core;
* model/ never imports training/, convert/, plan/ or bench/;
* the module import graph has no cycle;
* imports inside functions only for optional extras (and the listed lazy-dispatch points);
* the flag-parsing path (cli, training.pretrain, training.arguments and what they import at module level)
  never imports megatron-core, torch.distributed or transformers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_grin"
BASE_MODULES = ("megatron_grin.config", "megatron_grin.settings", "megatron_grin.compat", "megatron_grin.accounting",
                "megatron_grin.ckpt_format", "megatron_grin.ckpt_integrity")
SUBPACKAGES = ("model", "ops", "training", "convert", "plan", "bench")
#: heavy or optional packages a function may import lazily: optional extras, and transformers (seconds to import,
#: needed only for HF tokenizers, conversion and parity checks)
LAZY_OK = ("transformer_engine", "megatron.core.extensions", "triton", "wandb", "transformers", "matplotlib", "apex",
           "torch.utils.tensorboard", "tensorboard")
#: (module, imported module) pairs that are the CLI's lazy dispatch: the command is chosen before its code loads
LAZY_DISPATCH = {
    ("megatron_grin.cli", "*"),
    ("megatron_grin.__init__", "megatron_grin.model.sparsemixer"),
    ("megatron_grin.__init__", "megatron_grin.config"),
    ("megatron_grin.training.pretrain", "megatron_grin.training.trainer"),
}
LIGHT_ENTRY_POINTS = ("megatron_grin.cli", "megatron_grin.training.pretrain", "megatron_grin.training.arguments",
                      "megatron_grin.plan.cli")
HEAVY = ("megatron", "torch.distributed", "transformers")


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(tree: ast.Module, module: str, top_level_only: bool):
    """(imported module, in_function, lineno) for each import; ``from pkg import mod`` resolves to pkg.mod."""
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(node) for f in funcs for node in ast.walk(f)}
    for node in ast.walk(tree):
        in_function = id(node) in inside
        if top_level_only and in_function:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, in_function, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")[:-1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in MODULES else base), in_function, node.lineno


def _internal(name: str) -> str | None:
    """The megatron_grin module an import refers to (packages map to their __init__)."""
    if name in MODULES:
        return name
    if name + ".__init__" in MODULES:
        return name + ".__init__"
    return None


def _graph(top_level_only: bool = True) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, tree in MODULES.items():
        for name, _, _ in _imports(tree, module, top_level_only):
            target = _internal(name)
            if target and target != module:
                graph[module].add(target)
    return graph


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in SUBPACKAGES else None


def _leaf_op(module: str) -> bool:
    """An ops/ module that imports nothing from megatron_grin (pure torch maths, below every layer)."""
    return _subpackage(module) == "ops" and not any(
        _internal(name) for name, _, _ in _imports(MODULES[module], module, top_level_only=False))


def test_base_modules_import_no_subpackage():
    bad = [(m, t) for m in BASE_MODULES if m in MODULES
           for name, _, _ in _imports(MODULES[m], m, top_level_only=False)
           if (t := _internal(name)) and _subpackage(t) and not _leaf_op(t)]
    assert not bad, f"base modules must not import subpackages (leaf ops excepted): {bad}"


def test_ops_import_only_the_references_they_mirror():
    allowed = {"megatron_grin.model.sparsemixer", "megatron_grin.model.routing_rng"}
    bad = []
    for module, tree in MODULES.items():
        if _subpackage(module) != "ops":
            continue
        for name, _, line in _imports(tree, module, top_level_only=False):
            target = _internal(name)
            if _under(name, ("megatron",)) or (target and _subpackage(target) == "model" and target not in allowed):
                bad.append(f"{module}:{line} imports {name}")
            if target and _subpackage(target) in ("training", "convert", "plan", "bench"):
                bad.append(f"{module}:{line} imports {name}")
    assert not bad, bad


def test_model_never_imports_training_convert_plan_or_bench():
    bad = [f"{m}:{line} imports {name}" for m, tree in MODULES.items() if _subpackage(m) == "model"
           for name, _, line in _imports(tree, m, top_level_only=False)
           if (t := _internal(name)) and _subpackage(t) in ("training", "convert", "plan", "bench")]
    assert not bad, bad


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = _find_cycle(_graph(top_level_only=False))
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_detector_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_only_for_optional_extras_and_lazy_dispatch():
    bad = []
    for module, tree in MODULES.items():
        for name, in_function, line in _imports(tree, module, top_level_only=False):
            if not in_function or _under(name, LAZY_OK):
                continue
            if (module, "*") in LAZY_DISPATCH or (module, name) in LAZY_DISPATCH:
                continue
            bad.append(f"{module}:{line} imports {name} inside a function")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("entry", LIGHT_ENTRY_POINTS)
def test_flag_parsing_path_imports_no_megatron_torch_distributed_or_transformers(entry):
    graph = _graph(top_level_only=True)
    seen, todo, heavy = set(), [entry], []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name, _, line in _imports(MODULES[module], module, top_level_only=True):
            if _under(name, HEAVY):
                heavy.append(f"{module}:{line} imports {name}")
        todo.extend(graph[module])
    assert not heavy, f"{entry} loads heavy modules at import time: {heavy}"
