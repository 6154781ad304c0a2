"""The package's layers: every import (module level or inside a function) points down or
sideways, never up, and no modules import each other in a loop. No module reaches into another
for a private name (`from datagen.x import _name`, or `x._name` on an imported module): a seam
between modules is public, or the code moves.

A new module must be placed in `LAYERS` (longest matching prefix wins); the test names
any module that is not, so where a new piece sits is a decision, not an accident.
Imports under `if TYPE_CHECKING:` are skipped: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name of a package -> its folder (filters/, finetune/, templates/ are mapped in at build time)
PACKAGE_DIRS = {
    "datagen": ROOT / "datagen",
    "datagen.filters": ROOT / "filters",
    "datagen.finetune": ROOT / "finetune",
    "datagen.templates": ROOT / "templates",
}

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    # the vocabulary: task shape, errors, templates, ROUGE, model paths, chat views, progress
    ("datagen", "datagen.records", "datagen.errors", "datagen.prompts", "datagen.rouge",
     "datagen.model_paths", "datagen.templates", "datagen.chat", "datagen.progress", "datagen.rejects",
     "datagen.structured"),
    # config sections' building blocks; reading and atomic writing
    ("datagen.config", "datagen.io", "datagen.readers"),
    # the Backend protocol, Teacher (cache, stats), the backends and their registry
    ("datagen.teachers", "datagen.vllm_server"),
    # the work: filter passes, generation methods, training components (config, data, pairs,
    # student, losses, optimiser, checkpoints, ranks, the training run)
    ("datagen.filters", "datagen.generators", "datagen.finetune", "datagen.finetune.config",
     "datagen.finetune.data", "datagen.finetune.pairs", "datagen.finetune.model", "datagen.finetune.losses",
     "datagen.finetune.optim", "datagen.finetune.checkpoints", "datagen.finetune.distributed",
     "datagen.finetune.run", "datagen.finetune.harness", "datagen.finetune.ni_bench", "datagen.finetune.judged",
     "datagen.finetune.benchmarks"),
    # where work runs: this process, Ray (teacher calls), datatrove on processes / Ray / Slurm (filter shards)
    ("datagen.engines",),
    # stage runners, each owning its config section
    ("datagen.generate", "datagen.estimate", "datagen.filtering",
     "datagen.export",
     "datagen.finetune.sft", "datagen.finetune.dpo", "datagen.finetune.evaluate", "datagen.finetune.dpo_eval",
     "datagen.view"),
    # the whole-file config and the chained stages
    ("datagen.config_file", "datagen.distill", "datagen.finetune.launch"),
    # typer commands
    ("datagen.cli", "datagen.finetune.__main__"),
]


def module_files() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = [part for part in path.relative_to(folder).with_suffix("").parts if part != "__init__"]
            if package == "datagen" and parts and f"datagen.{parts[0]}" in PACKAGE_DIRS:
                continue  # a stray copy; the mapped folder is the real one
            found[".".join([package, *parts])] = path
    return found


def _skipped_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def _resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name an `from ... import` reads from."""
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reaches(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """`name`'s uses of another package module's private names: imported by name, or read as an
    attribute of an imported module (type-checking imports included: they are seams too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(node, package)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    module_aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif base in modules and base != name and _private(alias.name):
                    found.append(f"{name}:{node.lineno} imports {alias.name} from {base}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                and module_aliases.get(node.value.id, name) != name):
            found.append(f"{name}:{node.lineno} reads {module_aliases[node.value.id]}.{node.attr}")
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its body, resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _skipped_blocks(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def layer_of(name: str) -> int | None:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            # the root package matches only itself, not every module below it
            if name == prefix or (prefix != "datagen" and name.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    return best[0] if best else None


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (loop := visit(target)):
                return loop
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (loop := visit(node)):
            return loop
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in module_files() if layer_of(name) is None)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_no_import_points_up_a_layer():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) is not None and layer_of(name) is not None and layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    loop = find_cycle(import_graph())
    assert loop is None, " -> ".join(loop)


def test_no_module_reaches_for_another_modules_private_names():
    modules = module_files()
    found = [reach for name, path in modules.items() for reach in private_reaches(name, path, modules)]
    assert not found, "make these public or move the code:\n" + "\n".join(found)


def test_the_checker_finds_a_private_reach(tmp_path):
    source = tmp_path / "cli.py"
    source.write_text("from datagen.filters.dedup import _Thing, keep_rank\nfrom datagen.filters import dedup\n"
                      "dedup._helper()\nfrom datagen.cli import _mine\n", encoding="utf-8")
    modules = {"datagen.cli": source, "datagen.filters": source, "datagen.filters.dedup": source}
    assert private_reaches("datagen.cli", source, modules) == [
        "datagen.cli:1 imports _Thing from datagen.filters.dedup", "datagen.cli:3 reads datagen.filters.dedup._helper"]


def test_the_checker_finds_an_upward_import_and_a_loop():
    graph = {"datagen.records": {"datagen.cli"}, "datagen.cli": {"datagen.records"}}
    assert find_cycle(graph) == ["datagen.cli", "datagen.records", "datagen.cli"]
    assert layer_of("datagen.cli") > layer_of("datagen.records")
    assert layer_of("datagen.generators.self_instruct") == layer_of("datagen.filters.dedup")
