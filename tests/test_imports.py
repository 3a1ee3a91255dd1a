"""Imports go one way (DESIGN §2): `service` uses only the shared training modules, and nothing in `training`
imports `service`. Read statically from the source, so an import inside a function or a TYPE_CHECKING block
counts as much as one at the top of a module; then checked once more in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What both sides may share: the model, its features, the artifact and index formats, the Redis key names.
SHARED = {
    "training",
    "training.features",
    "training.model",
    "training.artifacts",
    "training.index",
    "training.redis_keys",
}


def imports_of(package: str) -> dict[str, set[str]]:
    """module -> every project module it imports anywhere in its source (absolute names)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).glob("*.py")):
        module = f"{package}.{path.stem}" if path.stem != "__init__" else package
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                found.add(f"{package}.{node.module}" if node.module else package)
        out[module] = {name for name in found if name.split(".")[0] in ("training", "service")}
    return out


def _modules(names: set[str], known: dict[str, set[str]]) -> set[str]:
    """The project modules among `names` ("training.model.TowerConfig" is training.model)."""
    return {name if name in known else name.rsplit(".", 1)[0] for name in names} & known.keys()


def test_no_training_module_imports_the_service_anywhere() -> None:
    training = imports_of("training")
    assert "training.train" in training and "training.cli" in training
    offenders = {m: sorted(n for n in names if n.split(".")[0] == "service") for m, names in training.items()}
    assert not {m: names for m, names in offenders.items() if names}


def test_service_reaches_only_the_shared_training_modules() -> None:
    training, service = imports_of("training"), imports_of("service")
    assert "service.app" in service
    reached = set().union(*(_modules(names, training) for names in service.values()))
    frontier = set(reached)
    while frontier:  # what those modules import in turn
        frontier = set().union(*(_modules(training[m], training) for m in frontier)) - reached
        reached |= frontier
    assert reached <= SHARED, f"service reaches {sorted(reached - SHARED)}"


def test_importing_the_service_loads_no_offline_module() -> None:
    modules = [f"service.{path.stem}" for path in sorted((ROOT / "service").glob("*.py"))]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = {m for m in json.loads(done.stdout) if m == "training" or m.startswith("training.")}
    assert loaded <= SHARED, f"importing the service loads {sorted(loaded - SHARED)}"
