"""The job report (artifact `report`): what a person would rather look at than read.

    metrics.jsonl        one row per optimizer step, as the workers logged it
    summary.json         best step, resumes, nodes, peak memory per worker, what DeepSpeed ran
    report.json          summary + export checks + Wise-FT sweep + the curves' numbers (+ corda.json if CorDA ran)
    index.html           one page with every plot and table
    loss.png             training loss per step and eval loss
    throughput.png       tokens/s per step
    adalora_ranks.png    AdaLoRA: effective rank per layer × step (a flat picture means ranks never moved)
    wise_ft.png          eval loss over α (W_base + α·ΔW)
    corda_spectrum.png   CorDA: covariance spectra and effective rank per layer (written by the decompose stage)
    sweep.html, sweep*   a sweep: every trial compared (orchestrator/stages/comparison.py); index.html is its best
"""

from __future__ import annotations

import html
import json
from contextlib import contextmanager
from pathlib import Path

from orchestrator.stages.context import Context, ExportOutputs


@contextmanager
def figure(out: Path, size: tuple[float, float]):
    """One matplotlib axes, saved to `out` as PNG and closed (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


def eval_curve(metrics: list[dict], at_start: float | None) -> list[list[float]]:
    """[step, eval loss] pairs, from step 0 (the model before training) when it was evaluated."""
    start = [[0, at_start]] if at_start is not None else []
    return start + [[m["step"], m["eval_loss"]] for m in metrics if "eval_loss" in m]


def plot_loss(metrics: list[dict], evals: list[list[float]], out: Path) -> None:
    with figure(out, (7, 4)) as (_, ax):
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss", linewidth=1)
        if evals:
            ax.plot([s for s, _ in evals], [e for _, e in evals], "o-", label="eval loss")
        ax.set(xlabel="optimizer step", ylabel="loss per label token", title="loss")
        ax.legend()


def plot_throughput(metrics: list[dict], out: Path) -> None:
    with figure(out, (7, 3.5)) as (_, ax):
        ax.plot([m["step"] for m in metrics], [m["tokens"] / m["step_s"] for m in metrics], linewidth=1)
        ax.set(xlabel="optimizer step", ylabel="tokens/s (all workers)", title="throughput per step")


def plot_ranks(metrics: list[dict], out: Path) -> None:
    layers = list(metrics[0]["ranks"])
    grid = [[m["ranks"][layer] for m in metrics] for layer in layers]
    with figure(out, (8, 1.5 + 0.3 * len(layers))) as (fig, ax):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(metrics[0]["step"] - 0.5, metrics[-1]["step"] + 0.5, len(layers) - 0.5, -0.5))
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set(xlabel="optimizer step", title="AdaLoRA effective rank per layer")
        fig.colorbar(image, ax=ax, label="rank")


def plot_wise_ft(rows: list[dict], out: Path) -> None:
    with figure(out, (6, 3.5)) as (_, ax):
        ax.plot([r["alpha"] for r in rows], [r["eval_loss"] for r in rows], "o-")
        ax.set(xlabel="α  (W_base + α·ΔW)", ylabel="eval loss", title="Wise-FT interpolation")


def table(rows: list[dict]) -> str:
    """An HTML table with one column per key of the first row."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    return html.escape(f"{value:.4g}" if isinstance(value, float) else str(value))


def write_report(ctx: Context) -> None:
    result, spec = ctx.needs("train"), ctx.spec
    folder = ctx.artifact_dir("report")
    metrics = result.metrics
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    summary = {"job": ctx.job_id, "best_step": result.best_step, "best_eval_loss": result.best_eval_loss,
               "eval_loss_at_start": result.eval_loss_at_start,
               "total_steps": result.total_steps, "resumed_from": result.resumed_from, "nodes": result.nodes,
               "peak_memory_mib": result.peak_memory_mib, "peak_memory_mib_per_stage": ctx.peaks,
               "engine": result.engine}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    exported = ctx.export or ExportOutputs()
    plots = []
    evals = eval_curve(metrics, result.eval_loss_at_start)
    if metrics:
        plot_loss(metrics, evals, folder / "loss.png")
        plot_throughput(metrics, folder / "throughput.png")
        plots += ["loss.png", "throughput.png"]
        if "ranks" in metrics[0]:
            plot_ranks(metrics, folder / "adalora_ranks.png")
            plots.append("adalora_ranks.png")
    if exported.wise_ft:
        plot_wise_ft(exported.wise_ft, folder / "wise_ft.png")
        plots.append("wise_ft.png")
    corda = json.loads((folder / "corda.json").read_text()) if (folder / "corda.json").exists() else None
    if (folder / "corda_spectrum.png").exists():
        plots.append("corda_spectrum.png")
    report = {**summary, **({"conversion": exported.conversion} if exported.conversion else {}),
              **({"wise_ft": exported.wise_ft} if exported.wise_ft else {}), "plots": plots,
              "curves": {"step": [m["step"] for m in metrics], "loss": [m["loss"] for m in metrics],
                         "eval": evals,
                         "tokens_per_s": [m["tokens"] / m["step_s"] for m in metrics]},
              "corda": corda}
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    sections = [f"<h1>peftfleet job {html.escape(ctx.job_id)}</h1>",
                f"<p>{html.escape(spec.adapter.method)} (init {html.escape(spec.init.method)}), "
                f"{result.total_steps} steps; best step {result.best_step}"
                + (f", {'eval' if spec.data.eval else 'training'} loss {result.best_eval_loss:.4f}"
                   if result.best_eval_loss is not None else "")
                + "</p>",
                table([{k: v for k, v in summary.items() if k not in ("engine", "job")}]),
                table([result.engine]) if result.engine else ""]
    if exported.conversion:
        sections.append("<h2>adapter on the original base</h2>" + table([exported.conversion]))
    if exported.wise_ft:
        sections.append("<h2>Wise-FT sweep</h2>" + table(exported.wise_ft))
    if (folder / "sweep.html").exists():
        sections.insert(1, '<p>This is the best trial of a sweep: <a href="sweep.html">every trial compared</a></p>')
    (folder / "index.html").write_text(page(ctx.job_id, sections, plots))


def page(title: str, sections: list[str], plots: list[str]) -> str:
    """One self-contained HTML page: the sections, then each plot under its name."""
    sections = sections + [f'<h2>{html.escape(p.removesuffix(".png").replace("_", " "))}</h2><img src="{p}">'
                           for p in plots]
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;text-align:right}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
