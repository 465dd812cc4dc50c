"""Every public class and function of the packages says what it is for (STYLE: docstrings on
public objects). A dataclass's generated signature does not count as a docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import handlers
import realtime
import server

PACKAGES: tuple[ModuleType, ...] = (server, handlers, realtime)


def _modules() -> list[ModuleType]:
    found = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            found.append(importlib.import_module(info.name))
    return found


def _own_doc(obj: object) -> str | None:
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None  # dataclasses generate "Name(field: type, ...)"
    return doc


def test_public_classes_have_docstrings() -> None:
    missing = [
        f"{module.__name__}.{name}"
        for module in _modules()
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and obj.__module__ == module.__name__
        and not name.startswith("_")
        and not _own_doc(obj)
    ]
    assert not missing, "public classes without a docstring: " + ", ".join(missing)


def test_modules_have_docstrings() -> None:
    missing = [module.__name__ for module in _modules() if not module.__doc__]
    assert not missing, "modules without a docstring: " + ", ".join(missing)
