"""The shape of the package: a core that imports nothing from the evaluation side."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ekfac_laplace

PACKAGE = Path(ekfac_laplace.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module to the ekfac_laplace modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(path) for path in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_core_imports_nothing_from_the_evaluation_side():
    graph = _imports()
    core = [m for m in graph if not m.startswith("ekfac_laplace.evaluation")]
    assert "ekfac_laplace.laplace" in core and "ekfac_laplace.engine" in core
    for module in core:
        wing = {t for t in graph[module] if t.startswith("ekfac_laplace.evaluation")}
        assert not wing, f"{module} imports {sorted(wing)}"


#: The core's layers, as docs/architecture.md draws them: a module may import only
#: modules of lower layers.
CORE_LAYERS = {
    "options": 0,
    "matrix": 1,
    "batches": 0,
    "_compat": 0,
    "distributed": 0,
    "kinds.base": 0,
    "eigh": 0,
    "errors": 0,
    "fitted": 0,
    "module_kinds": 1,
    "blocks.base": 1,
    "blocks.exact": 2,
    "blocks.diagonal": 2,
    "blocks.kronecker": 2,
    "blocks": 3,
    "diagonal": 2,
    "factors": 3,
    "sketch": 2,
    "output_curvature": 1,
    "backends": 1,
    "kinds.linear": 1,
    "kinds.convolution": 1,
    "kinds.gpt2_conv1d": 1,
    "kinds.attention": 1,
    "kinds.transposed_convolution": 2,
    "kinds": 3,
    "parameters": 0,
    "lowrank": 0,
    "hyperparameters": 0,
    "layer": 4,
    "layout": 5,
    "accumulators.base": 5,
    "driver": 6,
    "dense": 6,
    "state": 6,
    "accumulators.factors": 7,
    "accumulators.corrections": 6,
    "capture": 7,
    "accumulators.squares": 7,
    "probes": 8,
    "accumulators": 8,
    "layer_check": 9,
    "predictive": 9,
    "curvlinops_engine": 9,
    "sweep": 9,
    "engine": 10,
    "curvature": 11,
    "posterior": 12,
    "laplace": 13,
}


def test_core_modules_import_only_lower_layers():
    graph = _imports()
    core = {
        name.removeprefix("ekfac_laplace."): targets
        for name, targets in graph.items()
        if name.startswith("ekfac_laplace.")
        and ".evaluation" not in name
        and name != "ekfac_laplace.evaluation"
    }
    assert set(core) == set(CORE_LAYERS), "add new core modules to CORE_LAYERS"
    for module, targets in core.items():
        for target in targets:
            target = target.removeprefix("ekfac_laplace.")
            assert CORE_LAYERS[target] < CORE_LAYERS[module], f"{module} -> {target}"


def _table_rows() -> list[tuple[str, int, set[str]]]:
    """``(module, layer, imports)`` of each one-module, one-layer row of the table."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows = []
    for line in text.splitlines():
        found = re.fullmatch(r"\| (\d+) \| `([a-z_.]+)` \|.*\| ([^|]*) \|", line)
        if found:
            layer, module, imports = found.groups()
            names = {name.strip() for name in imports.split(",")} - {"—"}
            rows.append((module, int(layer), names))
    return rows


def test_the_architecture_table_draws_the_real_layers_and_imports():
    graph = _imports()
    rows = _table_rows()
    assert len(rows) > 30
    for module, layer, imports in rows:
        assert CORE_LAYERS[module] == layer, f"{module}: layer {layer} in the docs"
        real = set()
        for target in graph[f"ekfac_laplace.{module}"] - {"ekfac_laplace"}:
            target = target.removeprefix("ekfac_laplace.")
            package = target.split(".")[0]  # the docs may name a package's modules
            real.add(target if target in imports or package not in imports else package)
        shown = {name for name in imports if " " not in name}  # not a remark
        assert shown == real, f"{module}: the docs say {sorted(shown)}"


def test_the_import_graph_has_no_cycles():
    graph = _imports()
    graph = {m: {t for t in ts if t != "ekfac_laplace"} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_unknown_attributes_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'evaluation_side'"):
        ekfac_laplace.evaluation_side  # noqa: B018


def test_private_names_stay_in_their_module():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "ekfac_laplace"
            ):
                private = [
                    alias.name
                    for alias in node.names
                    if alias.name.startswith("_")
                    and not alias.name.startswith("__")  # dunders are public
                    and alias.name != "_compat"
                ]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_import_registers_ekfac_quickly_without_the_evaluation_side():
    """One fresh interpreter: ``import ekfac_laplace`` registers both classes, loads
    neither the evaluation side nor scikit-learn until an evaluation name is used,
    and our own modules' import time (``-X importtime`` self time, laplace-torch
    and torch excluded) stays small: ~25 ms when measured, bounded at 1 s."""
    code = (
        "import sys, torch, laplace, ekfac_laplace\n"
        "model = torch.nn.Linear(2, 2)\n"
        "for subset in ('all', 'last_layer'):\n"
        "    la = laplace.Laplace(model, 'regression', subset, 'ekfac')\n"
        "    print(type(la).__name__)\n"
        "print(sorted(m for m in ('ekfac_laplace.evaluation', 'sklearn') "
        "if m in sys.modules))\n"
        "ekfac_laplace.evaluate\n"
        "print('ekfac_laplace.evaluation' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["EKFACLaplace", "EKFACLLLaplace", "[]", "True"]
    ours = 0
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "ekfac_laplace" in line:
            self_us, _, name = (part.strip() for part in line[12:].split("|"))
            if name.startswith("ekfac_laplace") and "evaluation" not in name:
                ours += int(self_us)
    assert 0 < ours < 1_000_000, f"{ours / 1e6:.2f} s"
