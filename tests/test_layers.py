"""The import graph keeps the layers docs/ARCHITECTURE.md's table states (imports inside functions count too): the
table is read from there, so the rule written down and the rule checked are one."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import LAYERS, ROOT, imports, layer_of, layer_table


def test_every_module_and_folder_is_in_a_layer():
    graph = imports()
    assert graph and all(layer_of(module) in LAYERS for module in graph), sorted(graph)
    folders = {str(p.parent.relative_to(ROOT)) for top in ("jobspecs", "orchestrator", "workers")
               for p in (ROOT / top).rglob("*.py") if "examples" not in p.parts}
    assert folders - {"orchestrator", "workers"} == set(LAYERS)  # no folder without a row, no row without a folder


def test_imports_only_go_where_the_table_says():
    rules = layer_table()
    crossing = [f"{module} imports {target}" for module, targets in imports().items() for target in targets
                if layer_of(target) not in rules[layer_of(module)] | {layer_of(module)}]
    assert crossing == []


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for folder in LAYERS:
        init = Path(ROOT, folder, "__init__.py")
        assert init.is_file() and init.read_text().startswith('"""'), folder


def test_the_cli_and_the_gateway_import_no_torch():
    """What users run (and the gateway's request path) must start in a blink: no torch, peft or transformers."""
    import subprocess
    import sys

    code = ("import sys, orchestrator.api.cli, orchestrator.api.gateway; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
