"""Our import graph, with folders as layers: what tests/test_layers.py checks and docs/import-graph.png shows.

    python -m tests.import_graph [OUT.png]      # redraw the picture (default docs/import-graph.png)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def layer_table(text: str | None = None) -> dict[str, set[str]]:
    """docs/ARCHITECTURE.md's layers table, top to bottom: folder → the folders it may import (`workers/*`: every
    folder under workers/). The one statement of the rule: the test and the picture read it from there."""
    text = ARCHITECTURE.read_text() if text is None else text
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    table = {row[0].strip("`"): {c.strip().strip("`") for c in row[2].split(",") if c.strip() not in ("—", "")}
             for row in rows}
    for folder, allowed in table.items():
        globs = {a for a in allowed if a.endswith("/*")}
        table[folder] = (allowed - globs) | {f for g in globs for f in table if f.startswith(g[:-1])}
    return table


LAYERS = list(layer_table())  # top to bottom


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    path = module.replace(".", "/")
    return next(layer for layer in LAYERS if path == layer or path.startswith(layer + "/"))


def imports() -> dict[str, set[str]]:
    """Each of our modules → the modules of ours it imports (at any depth: inside functions too)."""
    ours = {p: module_name(p) for top in ("jobspecs", "orchestrator", "workers") for p in (ROOT / top).rglob("*.py")}
    known = set(ours.values())
    graph: dict[str, set[str]] = {}
    for path, module in ours.items():
        if path.name == "__init__.py":  # packages: docstrings only
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            targets |= {n for n in names if n in known and not (ROOT / n.replace(".", "/")).is_dir()}
        graph[module] = targets - {module}
    return graph


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = imports()
    rows = {layer: sorted(m for m in graph if layer_of(m) == layer) for layer in LAYERS}
    width = max(len(r) for r in rows.values())
    where = {m: ((i + 0.5) * width / len(r), -y) for y, (layer, r) in enumerate(rows.items()) for i, m in enumerate(r)}
    fig, ax = plt.subplots(figsize=(2.0 * width, 1.4 * len(LAYERS)))
    for y, layer in enumerate(LAYERS):
        ax.axhspan(-y - 0.4, -y + 0.4, color="0.93" if y % 2 else "0.87", zorder=0)
        ax.text(-0.1, -y, layer + "/", ha="right", va="center", fontsize=11, weight="bold")
    for module, targets in graph.items():
        for target in targets:
            ax.annotate("", xy=where[target], xytext=where[module], zorder=1,
                        arrowprops={"arrowstyle": "->", "color": "tab:blue", "alpha": 0.35, "lw": 0.8,
                                    "shrinkA": 12, "shrinkB": 12})
    for module, (x, y) in where.items():
        ax.text(x, y, module.rsplit(".", 1)[-1], ha="center", va="center", fontsize=9, zorder=2,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.4"})
    ax.set(xlim=(-0.2, width), ylim=(-len(LAYERS) + 0.5, 0.5), title="import graph: folders as layers, "
           "imports point down")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "import-graph.png")
