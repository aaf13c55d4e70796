"""The calibrate and decompose stages: CorDA initialisation at cluster scale.

calibrate
    The calibration samples are cut into fixed-size shards. N covariance actors (one model replica each) take
    shards round-robin; each shard's statistics come back whole, one object per input group. Per group, a chain
    of small add tasks folds the shards *in shard order* inside the object store — the driver never holds a
    covariance, and the sum is the same whatever actor computed what, however often a shard was retried (Ray
    restarts a dead actor and re-runs its unfinished shards; a shard's result exists once or not at all).
decompose
    One task per input group decomposes the group's layers where the reduced covariance is (Ray schedules tasks
    next to their largest argument), computing the damped inverse once per group. The driver then writes
    `residual_base` (base model with residual weights) and `corda_init` (a stock peft LoRA adapter), and checks
    init fidelity: residual base + adapter must reproduce the base model's logits.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobspecs.schema import JobSpec
from orchestrator.stages.context import Calibration, Context, CordaInit
from orchestrator.stages.waits import wait_all

log = logging.getLogger("peftfleet.corda")

# peft's guidance: ~256 samples × 2048 tokens for hidden size 4096, i.e. ~128 tokens per input dimension.
TOKENS_PER_DIM = 128


def calibration_samples(spec: JobSpec) -> tuple[list[list[int]], list[list[int]], int]:
    """(samples for the statistics, held-out samples for the fidelity check, pad id), as token ids."""
    from workers.data import load_tokenizer, pad_id, tokenize

    corda = spec.init.corda_spec
    tokenizer = load_tokenizer(spec)
    examples = tokenize(spec.data.calibration, tokenizer, spec.data, max_len=corda.seq_len)
    ids = [ex["input_ids"] for ex in examples if ex["input_ids"]]
    samples = ids[: corda.samples]
    held = ids[corda.samples : corda.samples + corda.fidelity_samples] or samples[: corda.fidelity_samples]
    if len(samples) < corda.samples:
        log.warning("calibrate: data.calibration has %d records, init.corda.samples asks for %d; using %d",
                    len(ids), corda.samples, len(samples))
    return samples, held, pad_id(spec, tokenizer)


def run_calibrate(ctx: Context) -> None:
    import ray

    from workers.covariance import CovarianceWorker
    from workers.reduce import Reducer

    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    samples, held, pad_id = calibration_samples(spec)
    if corda.covariance_from is not None:
        groups, stats = load_covariance(corda.covariance_from)
        log.info("calibrate: %d input groups loaded from %s; no collection", len(groups), corda.covariance_from)
        reducers = [ray.remote(Reducer).options(num_cpus=0, scheduling_strategy="SPREAD").remote()
                    for _ in range(corda.num_workers)]
        ctx.calibration = Calibration(groups=groups, totals=[ray.put(st) for st in stats], reducers=reducers,
                                      held=held, tokens=stats[0].tokens, calibrate_s=0.0)
        return
    shards = [samples[i : i + corda.shard_samples] for i in range(0, len(samples), corda.shard_samples)]
    # SPREAD: one replica per node where possible, so losing a node loses the fewest actors. Failures are bounded
    # by actor restarts; a shard is retried for as long as its actor can come back (a lost node makes the actor
    # "unavailable" many times before it is declared dead). Errors raised by our code are never retried.
    Actor = ray.remote(CovarianceWorker).options(
        num_cpus=1, num_gpus=1 if corda.use_gpu else 0, scheduling_strategy="SPREAD",
        max_restarts=corda.max_failures, max_task_retries=-1,
    )
    device = "cuda" if corda.use_gpu else "cpu"
    actors = [Actor.remote(str(spec.model.path), spec.model.dtype, corda.covariance_dtype, corda.activation_scale,
                           device) for _ in range(min(corda.num_workers, len(shards)))]
    # Reducers: one per covariance actor, spread like them, no CPU reservation — their adds are light and must not
    # wait behind the actors, and they decompose only after the actors have given their CPUs back. They start
    # now, beside the actors: a process start (import torch) during collection would steal the actors' cores.
    # Out of order: the fold order lives in the chain of object refs, not in the actor's queue, and an ordered
    # actor restarted with its node can stall 30 s waiting for a call sequence number that never comes.
    reducers = [ray.remote(Reducer).options(num_cpus=0, scheduling_strategy="SPREAD", max_restarts=-1,
                                            max_task_retries=-1, allow_out_of_order_execution=True).remote()
                for _ in actors]
    placement = wait_all([a.where.remote() for a in actors], fetch=True)
    wait_all([r.ready.remote() for r in reducers], fetch=True)
    for i, (pid, node) in enumerate(placement):
        log.info("calibrate: covariance actor %d is pid %d on node %s", i, pid, node[:12])
    groups = ray.get(actors[0].groups.remote(spec.adapter.target_modules, samples[0]))
    log.info("calibrate: %d samples in %d shards on %d actor(s); %d input groups: %s", len(samples), len(shards),
             len(actors), len(groups), ", ".join(f"{g.name}[{len(g.modules)}]" for g in groups))

    totals: list[Any] = [None] * len(groups)
    done_refs = []
    start = time.perf_counter()
    for i, shard in enumerate(shards):
        parts = actors[i % len(actors)].collect.options(num_returns=len(groups) + 1).remote(
            i, shard, groups, corda.batch_size, pad_id)
        done_refs.append(parts[-1])
        for g, part in enumerate(parts[:-1]):  # shard order per group: the sum does not depend on scheduling
            totals[g] = part if totals[g] is None else reducers[g % len(reducers)].add.remote(totals[g], part)
    tokens = sum(len(s) for s in samples)

    def progress(done: int) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(shards) - done) if done else float("nan")
        log.info("calibrate: shard %d/%d, %.0f tokens/s, eta %.0fs", done, len(shards),
                 tokens * done / len(shards) / elapsed, eta)

    summaries = wait_all(done_refs, on_progress=progress, fetch=True)
    wait_all(totals)
    for actor in actors:  # free their CPUs (and GPUs) for the decomposition
        ray.kill(actor)
    ctx.calibration = Calibration(groups=groups, totals=totals, reducers=reducers, held=held, tokens=tokens,
                                  calibrate_s=time.perf_counter() - start, shards=summaries, actors=placement)


def run_decompose(ctx: Context) -> None:
    import ray


    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    state: Calibration = ctx.needs("calibration")
    groups, totals, reducers = state.groups, state.totals, state.reducers
    scaling = spec.adapter.alpha / spec.adapter.r
    # Each group is decomposed by the reducer that produced its sum, i.e. where the covariance already is.
    refs = [reducers[g % len(reducers)].decompose.remote(total, group.name, group.modules, str(spec.model.path),
                                                         spec.adapter.r, corda.mode, scaling, corda.damping)
            for g, (group, total) in enumerate(zip(groups, totals, strict=True))]
    start = time.perf_counter()
    wait_all(refs, on_progress=lambda n: log.info("decompose: group %d/%d", n, len(refs)))
    decompose_s = time.perf_counter() - start
    if corda.save_covariance:
        _save_covariance(ctx.artifact_dir("covariance"), groups, totals)
    results = []
    for ref in refs:  # one group's layers at a time in the driver's memory
        results.append(ray.get(ref))
    for reducer in reducers:
        ray.kill(reducer)
    totals.clear()  # the statistics and results are no longer needed: let the object store free them
    refs.clear()
    residual_dir, adapter_dir = ctx.artifact_dir("residual_base"), ctx.artifact_dir("corda_init")
    write_corda_outputs(spec, results, residual_dir, adapter_dir)
    # In the driver, beside the staging folder it reads (a cluster's head often has no CPUs for tasks).
    fidelity = init_fidelity(str(spec.model.path), str(residual_dir), str(adapter_dir), state.held)
    report = diagnostics(spec, results, fidelity, state.tokens, state.calibrate_s, decompose_s)
    for g in results:
        log.info("decompose: %s [%s]: %d samples, %d tokens, effective rank %.1f/%d, cond(C') %.2e, damping %g, "
                 "max reconstruction error %.1e", g.group, ",".join(m.rsplit(".", 1)[-1] for m in g.modules),
                 g.samples, g.tokens, g.effective_rank, g.dim, g.condition_number, g.damping,
                 max(layer.reconstruction_error for layer in g.layers))
    for warning in report["warnings"]:
        log.warning("decompose: %s", warning)
    ctx.warnings.extend(report["warnings"])
    report_dir = ctx.artifact_dir("report")
    (report_dir / "corda.json").write_text(json.dumps(report, indent=2))
    plot_spectra(results, report_dir / "corda_spectrum.png")
    ctx.corda_init = CordaInit(residual_base=residual_dir, adapter=adapter_dir, fidelity_samples=state.held)
    log.info("decompose: init fidelity max |Δlogits| %.2e (tolerance %.0e)", fidelity, corda.fidelity_tolerance)
    if not fidelity <= corda.fidelity_tolerance:
        raise ValueError(f"init-fidelity check failed: residual base + CorDA adapter changes the logits by up to "
                         f"{fidelity:.3e} (> init.corda.fidelity_tolerance {corda.fidelity_tolerance:.0e}); "
                         "the decomposition is not exact for this model and dtype")


def _save_covariance(out: Path, groups, totals) -> None:
    """The reduced sums exactly as decomposed (Σxᵀx and counts), one group at a time, plus the group index."""
    import ray
    from safetensors.torch import save_file

    index = []
    for g, total in zip(groups, totals, strict=True):
        stats = ray.get(total)
        file = f"{g.name}.safetensors"
        save_file({"xtx": stats.xtx.contiguous()}, str(out / file),
                  metadata={"samples": str(stats.samples), "tokens": str(stats.tokens)})
        index.append({"group": g.name, "modules": list(g.modules), "dim": g.dim, "file": file})
    (out / "groups.json").write_text(json.dumps(index, indent=2))


def load_covariance(folder: Path):
    """Inverse of _save_covariance: (input groups, their GroupStats), in the saved order."""
    from safetensors import safe_open

    from workers.covariance import GroupStats, InputGroup

    index_file = Path(folder) / "groups.json"
    if not index_file.is_file():
        raise ValueError(f"init.corda.covariance_from: {folder} is not a `covariance` artifact (no groups.json)")
    groups, stats = [], []
    for row in json.loads(index_file.read_text()):
        with safe_open(Path(folder) / row["file"], framework="pt") as f:
            meta = f.metadata()
            stats.append(GroupStats(f.get_tensor("xtx"), int(meta["samples"]), int(meta["tokens"])))
        groups.append(InputGroup(row["group"], tuple(row["modules"]), row["dim"]))
    return groups, stats


def write_corda_outputs(spec: JobSpec, results, residual_dir: Path, adapter_dir: Path) -> None:
    """residual_base: the base model with W_res; corda_init: a stock LoRA adapter holding the CorDA A, B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=getattr(torch, spec.model.dtype))
    modules = dict(model.named_modules())
    layers = [layer for group in results for layer in group.layers]
    with torch.no_grad():
        for layer in layers:
            modules[layer.name].weight.copy_(layer.residual)
    model.save_pretrained(residual_dir)
    if (tokenizer := load_tokenizer(spec)) is not None:  # a complete model folder, as the base was
        tokenizer.save_pretrained(residual_dir)
    config = LoraConfig(r=spec.adapter.r, lora_alpha=spec.adapter.alpha, lora_dropout=spec.adapter.dropout,
                        target_modules=sorted({name.split(".")[-1] for name in (layer.name for layer in layers)}),
                        init_lora_weights=True, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for layer in layers:
            target = peft_modules[layer.name]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    peft_model.save_pretrained(adapter_dir)


def init_fidelity(base_path: str, residual_dir: str, adapter_dir: str, samples: list[list[int]]) -> float:
    """max |logits(residual base + corda adapter) − logits(base)| over `samples`, loaded the way a user would."""
    from workers.adapter_math import load_model, max_logit_gap

    return max_logit_gap(load_model(residual_dir, Path(adapter_dir)), load_model(base_path), samples)


def diagnostics(spec: JobSpec, results, fidelity: float, tokens: int, calibrate_s: float, decompose_s: float
                ) -> dict:
    warnings = []
    deficient = [g for g in results if g.numerical_rank < g.dim]
    if deficient:
        ranks = ", ".join(f"{g.group} {g.numerical_rank}/{g.dim}" for g in deficient)
        warnings.append(f"{len(deficient)} input group(s) have a rank-deficient covariance ({ranks}): too few or "
                        f"too short calibration samples ({deficient[0].samples} samples, {deficient[0].tokens} "
                        "tokens); add samples or use longer ones")
    thin = [g for g in results if g not in deficient and g.tokens < TOKENS_PER_DIM * g.dim]
    if thin:
        dims = sorted({g.dim for g in thin})
        warnings.append(f"{len(thin)} input group(s) saw fewer calibration tokens than peft's guidance of "
                        f"~{TOKENS_PER_DIM} per input dimension ({thin[0].tokens} tokens for dimension(s) "
                        f"{', '.join(map(str, dims))}; e.g. 256 samples × 2048 tokens for hidden 4096, and short "
                        "~60-token samples need ~10× more samples)")
    groups = []
    for g in results:
        row = {k: v for k, v in asdict(g).items() if k not in ("layers", "eigenvalues")}
        row["layers"] = [{"name": layer.name, "reconstruction_error": layer.reconstruction_error}
                         for layer in g.layers]
        groups.append(row)
    return {"mode": spec.init.corda_spec.mode, "r": spec.adapter.r, "tokens": tokens,
            "calibrate_s": calibrate_s, "decompose_s": decompose_s, "init_fidelity_max_abs_logit_diff": fidelity,
            "fidelity_tolerance": spec.init.corda_spec.fidelity_tolerance, "groups": groups, "warnings": warnings}


def plot_spectra(results, out: Path) -> None:
    """Covariance eigenvalue spectrum per input group, and effective rank per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in results:
        eig = [max(v, 1e-12) for v in g.eigenvalues]
        left.semilogy(range(1, len(eig) + 1), eig, label=g.group.removeprefix("model."), linewidth=1)
    left.set(title="covariance spectrum per input group", xlabel="index", ylabel="eigenvalue")
    if len(results) <= 12:
        left.legend(fontsize=6)
    names = [g.group.removeprefix("model.") for g in results]
    right.barh(names, [g.dim for g in results], color="lightgrey", label="input dimension")
    right.barh(names, [g.effective_rank for g in results], color="tab:blue", label="effective rank")
    right.set(title="effective rank (exp entropy of eigenvalues)", xlabel="rank")
    right.tick_params(axis="y", labelsize=6)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
