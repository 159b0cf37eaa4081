"""The package's layers: imports point downwards only, and the step's side loads no TensorFlow."""

import ast
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = REPO / "detcon"
SHARED = ("cli", "errors", "devices")
ENTRY_POINTS = ("main_loop", "evaluate")
# What each layer may import besides itself (the README's Layout table, as a rule).
ALLOWED = {
    "shared": set(),
    "ops": set(),
    "models": {"ops"},
    "methods": {"ops", "models", "shared"},
    "workdir": {"shared"},
    "weights": {"models", "workdir", "shared"},
    "data": {"shared"},
    "data.build": {"data", "shared"},
    "train": {
        "ops",
        "models",
        "methods",
        "workdir",
        "weights",
        "data",
        "data.build",
        "evaluation",
        "shared",
    },
    "evaluation": {"ops", "models", "weights", "workdir", "data", "data.build", "shared"},
    "benchmark": {"ops", "models", "methods", "train", "data", "data.build", "shared"},
    "study": {
        "ops",
        "models",
        "methods",
        "train",
        "workdir",
        "weights",
        "data",
        "data.build",
        "evaluation",
        "shared",
    },
    "entry": {
        "ops",
        "models",
        "methods",
        "train",
        "workdir",
        "weights",
        "data",
        "data.build",
        "evaluation",
        "study",
        "shared",
    },
}


def _layer(module: str) -> str:
    """The layer of a dotted module name under detcon ('detcon.data.build.scenes' -> 'data.build')."""
    parts = module.split(".")[1:]
    if not parts:
        return "package"
    if parts[0] in SHARED:
        return "shared"
    if parts[0] in ENTRY_POINTS:
        return "entry"
    if parts[0] == "data" and len(parts) > 1 and parts[1] == "build":
        return "data.build"
    return parts[0]


def _imports(path: pathlib.Path) -> set[str]:
    """Every detcon module a file imports, at any depth of its code (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detcon"):
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("detcon"))
    return found


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_top_level_holds_only_entry_points_and_shared_modules():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__", *ENTRY_POINTS, *SHARED}


def test_imports_point_downwards_only():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        if layer == "package":
            continue
        for imported in _imports(path):
            target = _layer(imported)
            if target not in (layer, "package") and target not in ALLOWED[layer]:
                violations.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_an_upward_import(tmp_path):
    """Not vacuous: an ops module importing the trainer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from detcon.train import loop\n")
    assert _layer(next(iter(_imports(bad)))) not in ALLOWED["ops"]


@pytest.mark.parametrize("module", ["detcon.ops", "detcon.ops.losses", "detcon.ops.augment"])
def test_ops_load_nothing_of_train_workdir_or_data(module):
    code = (
        f"import sys, {module}, importlib; "
        "[importlib.import_module(m) for m in list(sys.modules) if m.startswith('detcon.ops')]; "
        "bad = sorted(m for m in sys.modules if m.startswith(('detcon.train', "
        "'detcon.workdir', 'detcon.data'))); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_step_side_loads_no_tensorflow():
    """A GPU host can run the step with JAX-side packages alone."""
    code = (
        "import sys; import detcon.ops, detcon.models, detcon.methods, detcon.train.step; "
        "import detcon.ops.augment, detcon.ops.masks, detcon.ops.queues, detcon.ops.shuffle_bn; "
        "import detcon.models.heads, detcon.models.moco_heads, detcon.models.precision; "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
