"""A sweep's comparison report (in the `report` artifact): one page to choose a trial from.

    sweep.html           every trial in a table (values, status, parameters, best metric, steps, tokens/s,
                         time), the overlaid curves, a parameter-vs-metric plot per swept field, flagged seeds
    sweep.json           the same numbers, and the outcome of every trial
    sweep_curves.png     every trial's training loss and eval loss, overlaid
    sweep_<field>.png    the best metric against one swept field's values

Seed variance: trials that differ in train.seed and in no grid or random axis are repeats of one configuration.
With at least three seeds, a trial whose best metric, or whose eval curve, lies far from its repeats' (a robust
z-score over the median absolute deviation above OUTLIER_Z) is flagged — the "abnormal seed" to look at first.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator.stages.report import eval_curve, figure, page, table

OUTLIER_Z = 3.5  # Iglewicz and Hoaglin's cut for the modified z-score
MAD_FLOOR = 0.01  # relative: repeats agreeing to within 1% are not spread enough to call one an outlier


def _robust_z(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    median = statistics.median(finite) if finite else 0.0
    mad = statistics.median([abs(v - median) for v in finite]) if finite else 0.0
    scale = max(mad, MAD_FLOOR * abs(median), 1e-12)
    return [0.6745 * (v - median) / scale if math.isfinite(v) else math.inf for v in values]


def _curve_gap(curve: list[list[float]], others: list[list[list[float]]]) -> float:
    """Mean |eval loss − the repeats' median eval loss| over the steps all of them evaluated."""
    steps = set.intersection(*({s for s, _ in c} for c in [curve, *others]))
    if not steps:
        return 0.0
    at = [dict((s, e) for s, e in c) for c in [curve, *others]]
    gaps = [abs(at[0][s] - statistics.median(a[s] for a in at)) for s in sorted(steps)]
    return sum(gaps) / len(gaps)


def seed_outliers(outcomes: list, axes: list[str], metric: str) -> dict[str, str]:
    """Trial name → why it is flagged, among repeats of one configuration that differ only in train.seed."""
    groups: dict[str, list] = {}
    for o in outcomes:
        key = json.dumps([o.task, {k: o.values.get(k) for k in axes if k != "train.seed"}], sort_keys=True,
                         default=str)
        groups.setdefault(key, []).append(o)
    flagged = {}
    for group in groups.values():
        seeds = {o.values.get("train.seed") for o in group}
        if len(group) < 3 or len(seeds) < len(group) or None in seeds:
            continue
        best = [o.best if o.best is not None else math.inf for o in group]
        curves = [eval_curve(o.result.get("metrics", []), o.result.get("eval_loss_at_start")) for o in group]
        gaps = [_curve_gap(c, [d for j, d in enumerate(curves) if j != i]) for i, c in enumerate(curves)]
        for o, z_best, z_gap, value in zip(group, _robust_z(best), _robust_z(gaps), best, strict=True):
            median = statistics.median(b for b in best if math.isfinite(b)) if any(map(math.isfinite, best)) else 0
            if abs(z_best) > OUTLIER_Z:
                flagged[o.name] = (f"{metric} {value:.4f} vs {median:.4f} for its {len(group) - 1} other seeds "
                                   f"(robust z {z_best:.1f})")
            elif abs(z_gap) > OUTLIER_Z:
                flagged[o.name] = f"its eval curve strays from its other seeds' (robust z {z_gap:.1f})"
    return flagged


def _row(o, metric: str, flags: dict[str, str]) -> dict[str, Any]:
    rows = o.result.get("metrics", [])
    return {"trial": o.name, **({"task": o.task} if o.task else {}),
            **{k.rsplit(".", 1)[-1]: v for k, v in o.values.items()}, "status": o.status,
            "trainable params": o.params, f"best {metric}": None if o.best is None else round(o.best, 4),
            "best step": o.result.get("best_step"), "steps": o.result.get("total_steps"),
            "tokens/s": round(rows[-1]["tokens_per_s"]) if rows else None,
            "train s": round(sum(r.get("step_s", 0) for r in rows), 1), "flag": flags.get(o.name, o.reason)}


def write_comparison(folder: Path, outcomes: list, swept: list[str], axes: list[str], metric: str,
                     best: str) -> dict[str, str]:
    """The comparison page and its plots into `folder`: `swept` are every field some trial sets, `axes` the
    grid's and random draws' (what tells repeats apart). Returns the flagged seeds (trial → why)."""
    flags = seed_outliers(outcomes, axes, metric)
    rows = [_row(o, metric, flags) for o in outcomes]
    (folder / "sweep.json").write_text(json.dumps({"metric": metric, "best": best, "swept": swept, "flagged": flags,
                                                   "trials": [asdict(o) for o in outcomes]}, indent=2))
    plots = ["sweep_curves.png"]
    with figure(folder / "sweep_curves.png", (10, 4)) as (fig, ax):
        ax.remove()
        train_ax, eval_ax = fig.subplots(1, 2)
        for o in outcomes:
            rows_o = o.result.get("metrics", [])
            style = {"linewidth": 2.5 if o.name == best else 1, "linestyle": "--" if o.name in flags else "-"}
            train_ax.plot([r["step"] for r in rows_o], [r["loss"] for r in rows_o], label=o.name, **style)
            evals = eval_curve(rows_o, o.result.get("eval_loss_at_start"))
            eval_ax.plot([s for s, _ in evals], [e for _, e in evals], "o", label=o.name, **style)
        train_ax.set(xlabel="optimizer step", ylabel="loss per label token", title="training loss")
        eval_ax.set(xlabel="optimizer step", title="eval loss (bold: best; dashed: flagged)")
        eval_ax.legend(fontsize=7)
    for axis in swept:
        points = [(o.values.get(axis), o.best) for o in outcomes if o.best is not None and math.isfinite(o.best)]
        if not points:
            continue
        name = f"sweep_{axis.replace('.', '_')}.png"
        with figure(folder / name, (5, 3.5)) as (_, ax):
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v, _ in points)
            xs = [v if numeric else str(v) for v, _ in points]
            ax.plot(xs, [b for _, b in points], "o")
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            ax.set(xlabel=axis, ylabel=f"best {metric}", title=f"{axis} vs {metric}")
        plots.append(name)
    sections = [f"<h1>sweep: {len(outcomes)} trials, best {html.escape(best)}</h1>",
                '<p><a href="index.html">the best trial\'s report</a></p>', table(rows)]
    if flags:
        sections.append("<h2>flagged seeds</h2><ul>" + "".join(
            f"<li>{html.escape(n)}: {html.escape(why)}</li>" for n, why in flags.items()) + "</ul>")
    (folder / "sweep.html").write_text(page("sweep", sections, plots))
    return flags
