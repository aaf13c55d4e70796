"""No file a user can reach is ever unpickled: job code (jobspecs/, workers/, orchestrator/) never calls a loader
that can run code from what it reads. Tensors are read with safetensors, configs with json or yaml.safe_load.

What the libraries unpickle themselves is not reachable either: DeepSpeed's own checkpoints (`load_checkpoint`)
are written by the job into its store, which no user can write (a gateway's store is refused inside its data
root), and Ray's object store holds only what our processes put there."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module → the functions of it that can run code from the bytes they read
UNSAFE = {"pickle": {"load", "loads", "Unpickler"}, "cloudpickle": {"load", "loads"}, "dill": {"load", "loads"},
          "marshal": {"load", "loads"}, "shelve": {"open"}, "joblib": {"load"}, "torch": {"load"},
          "yaml": {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"},
          "numpy": {"load"}, "np": {"load"}}


def unsafe_calls(source: str) -> list[str]:
    """`module.function` calls (or `from module import function`) of the loaders above, and any
    `weights_only=False` / `allow_pickle=True` keyword."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in UNSAFE:
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in UNSAFE[node.module]]
        elif isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and func.attr in UNSAFE.get(func.value.id, ())):
                found.append(f"{func.value.id}.{func.attr}(...)")
            found += [f"{k.arg}={k.value.value!r}" for k in node.keywords if isinstance(k.value, ast.Constant)
                      and (k.arg, k.value.value) in (("weights_only", False), ("allow_pickle", True))]
    return found


def test_the_scan_sees_what_it_looks_for():
    planted = ("import pickle, torch, yaml\nfrom pickle import loads\npickle.load(f)\n"
               "torch.load(p, weights_only=False)\nyaml.load(s)\n")
    assert unsafe_calls(planted) == ["from pickle import loads", "pickle.load(...)", "torch.load(...)",
                                     "weights_only=False", "yaml.load(...)"]
    assert unsafe_calls("import yaml, json\nyaml.safe_load(s)\njson.loads(s)\n") == []


def test_job_code_never_unpickles():
    files = [p for top in ("jobspecs", "workers", "orchestrator") for p in sorted((ROOT / top).rglob("*.py"))]
    assert len(files) > 40
    found = {str(p.relative_to(ROOT)): calls for p in files if (calls := unsafe_calls(p.read_text()))}
    assert found == {}
