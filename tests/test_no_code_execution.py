"""The library's I/O never runs code from a file: no pickle or its relatives, no eval/exec, no unsafe loaders.

Scans the syntax tree of every module under src/lora_lite, so docstrings that mention pickle do not count
and an aliased import (`import pickle as p`) still does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lora_lite

SRC = Path(lora_lite.__file__).parent
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "copyreg"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            func, kwargs = node.func, {k.arg: k.value for k in node.keywords}
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if isinstance(func, ast.Name) and name in BANNED_CALLS:
                found.append(f"{name}()")
            if owner == "torch" and name == "load":
                safe = kwargs.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append("torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                found.append("numpy.load")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                found.append(f"yaml.{name}")
            remote = kwargs.get("trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                found.append("trust_remote_code")
        elif isinstance(node, ast.Attribute) and node.attr in ("loads", "load", "Unpickler") and \
                isinstance(node.value, ast.Name) and node.value.id in BANNED_MODULES:
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_scanner_catches_each_pattern():
    bad = ("import pickle\nfrom dill import loads\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "eval('1')\nexec('x')\nyaml.load(s)\nnp.load(f, allow_pickle=True)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(violations(ast.parse(bad))) == 9
    good = "model.eval()\ntorch.load(f, weights_only=True)\n'pickle'\nx = compile_regex\n"
    assert violations(ast.parse(good)) == []


def test_library_never_unpickles_or_evals():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 15
    found = {str(f.relative_to(SRC)): v for f in files if (v := violations(ast.parse(f.read_text(), str(f))))}
    assert found == {}
