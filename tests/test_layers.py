"""The import graph keeps the layers docs/ARCHITECTURE.md draws: jobspecs ← workers ← orchestrator, and inside
orchestrator api → control → stages → storage, never upwards (imports inside functions count too)."""

from __future__ import annotations

from tests.import_graph import LAYERS, imports, layer_of

# which layers each layer may import (besides itself); jobspecs is the bottom, open to all
ALLOWED = {
    "jobspecs": set(),
    "workers": {"jobspecs"},
    "orchestrator/storage": {"jobspecs"},
    "orchestrator/stages": {"orchestrator/storage", "workers", "jobspecs"},
    "orchestrator/control": {"orchestrator/stages", "orchestrator/storage", "workers", "jobspecs"},
    "orchestrator/api": {"orchestrator/control", "orchestrator/storage", "jobspecs"},  # no workers: no torch in the CLI
}


def test_every_module_is_in_a_layer():
    assert set(ALLOWED) == set(LAYERS)
    graph = imports()
    assert graph and all(layer_of(module) in ALLOWED for module in graph), sorted(graph)


def test_imports_only_go_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in imports().items() for target in targets
              if layer_of(target) not in ALLOWED[layer_of(module)] | {layer_of(module)}]
    assert upward == []
