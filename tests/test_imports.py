"""Imports go one way (DESIGN §2): `service` uses only training.{features,model,artifacts,index}, and no training
module imports `service` when it is imported. Checked in fresh interpreters, so nothing a test imported earlier
can hide a violation."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from types import ModuleType

import service
import training

SHARED = {"training", "training.features", "training.model", "training.artifacts", "training.index"}


def _modules(package: ModuleType) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_service_imports_only_the_shared_training_modules() -> None:
    modules = _modules(service)
    assert "service.app" in modules
    loaded = _loaded_after_importing(modules)
    training_loaded = {m for m in loaded if m == "training" or m.startswith("training.")}
    assert training_loaded <= SHARED, f"service imports {sorted(training_loaded - SHARED)}"


def test_no_training_module_imports_the_service() -> None:
    modules = _modules(training)
    assert "training.train" in modules
    loaded = _loaded_after_importing(modules)
    assert not {m for m in loaded if m == "service" or m.startswith("service.")}
