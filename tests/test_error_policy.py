"""The error family is complete and documented: every user-facing raise in the core is a LoraLiteError, and
docs/errors.md names every class."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lora_lite as ll
from lora_lite import errors

SRC = Path(ll.__file__).parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, ll.LoraLiteError)]
# internal signals that are caught and re-raised as CheckpointError a few lines later, and the module
# __getattr__ protocol (a missing attribute must be an AttributeError)
CAUGHT_INTERNALLY = {("validate.py", "no_duplicates"), ("validate.py", "no_constants"), ("__init__.py", "__getattr__")}


def test_every_error_class_is_exported_and_documented():
    assert len(CLASSES) >= 8
    text = DOC.read_text()
    for cls in CLASSES:
        assert getattr(ll, cls.__name__) is cls
        assert f"`{cls.__name__}`" in text, f"{cls.__name__} is missing from docs/errors.md"
        if cls is not ll.LoraLiteError:
            assert any(issubclass(cls, b) for b in (ValueError, TypeError, KeyError, RuntimeError))


def _own_nodes(func):
    """Nodes of `func`, not descending into the functions nested in it (they are visited on their own)."""
    nested = (ast.FunctionDef, ast.AsyncFunctionDef)
    stack = [n for n in func.body if not isinstance(n, nested)]
    while stack:
        node = stack.pop()
        yield node
        stack += [c for c in ast.iter_child_nodes(node) if not isinstance(c, nested)]


def test_core_raises_only_the_family():
    """Core modules (not the bench/cost CLI subpackages) raise LoraLiteError subclasses, never bare builtins."""
    allowed = {c.__name__ for c in CLASSES}
    bad = []
    for path in [*SRC.glob("*.py"), *SRC.glob("variants/*.py"), *SRC.glob("hf/*.py")]:
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in _own_nodes(func):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", "?"))
                    if name not in allowed and name != "_bad" and (path.name, func.name) not in CAUGHT_INTERNALLY:
                        bad.append(f"{path.name}:{node.lineno} {func.name} raises {name}")
    assert bad == []
