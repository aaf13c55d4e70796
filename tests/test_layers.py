"""The import graph keeps the layers docs/ARCHITECTURE.md draws: jobspecs ← workers ← orchestrator, and inside
orchestrator api → control → stages → storage, never upwards (imports inside functions count too)."""

from __future__ import annotations

from tests.import_graph import LAYERS, imports, layer_of

# which layers each layer may import (besides itself); jobspecs is the bottom, open to all
ALLOWED = {
    "jobspecs": set(),
    "workers": {"jobspecs"},
    "orchestrator/storage": {"jobspecs", "workers"},  # the store client is workers/store.py (workers write too)
    "orchestrator/stages": {"orchestrator/storage", "workers", "jobspecs"},
    "orchestrator/control": {"orchestrator/stages", "orchestrator/storage", "workers", "jobspecs"},
    "orchestrator/api": {"orchestrator/control", "orchestrator/storage", "jobspecs", "workers"},
}
# the CLI and the gateway start without torch: of the workers, they may import only the store client
API_WORKERS = {"workers.store"}


def test_every_module_is_in_a_layer():
    assert set(ALLOWED) == set(LAYERS)
    graph = imports()
    assert graph and all(layer_of(module) in ALLOWED for module in graph), sorted(graph)


def test_imports_only_go_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in imports().items() for target in targets
              if layer_of(target) not in ALLOWED[layer_of(module)] | {layer_of(module)}]
    assert upward == []
    api = {t for m, targets in imports().items() if layer_of(m) == "orchestrator/api" for t in targets
           if layer_of(t) == "workers"}
    assert api <= API_WORKERS, api


def test_the_cli_and_the_gateway_import_no_torch():
    """What users run (and the gateway's request path) must start in a blink: no torch, peft or transformers."""
    import subprocess
    import sys

    code = ("import sys, orchestrator.api.cli, orchestrator.api.gateway; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
