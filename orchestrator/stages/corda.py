"""The calibrate and decompose stages: CorDA initialisation at cluster scale.

calibrate
    The calibration samples are cut into fixed-size shards. With strategy replica, N covariance actors (one model
    replica each) take shards round-robin; with layerwise, each of N actors owns shards i mod N and the actors walk
    the decoder blocks together, one block in memory at a time (workers/corda/layerwise.py). Either way each shard's
    statistics come back whole, one object per input group. Per group, a chain
    of small add tasks folds the shards *in shard order* inside the object store — the driver never holds a
    covariance, and the sum is the same whatever actor computed what, however often a shard was retried (Ray
    restarts a dead actor and re-runs its unfinished shards; a shard's result exists once or not at all).
decompose
    Each input group is decomposed by the reducer holding its reduced covariance, computing the damped inverse
    once per group, and that reducer writes the group's residual weights as a `residual_base` shard straight into
    the job's store; the unchanged tensors are copied into further shards by the same pool. The driver writes only
    small files: the shard index and config, and `corda_init` (a stock peft LoRA adapter) from the A, B factors.
    A worker then checks init fidelity: residual base + adapter must reproduce the base model's logits. No
    process holds the whole model during the decomposition, and the driver holds none of it at any point.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobspecs.confinement import Outside, entry
from jobspecs.memory import SHARD_BYTES, choose_corda_strategy, layerwise_spills, replica_bytes
from jobspecs.remote import Location, read_json
from jobspecs.schema import JobSpec
from orchestrator.stages.context import Calibration, Context, CordaInit, Early
from orchestrator.stages.waits import model_task, wait_all
from workers.storage.node_cache import NodeCache, node_cache
from workers.storage.store import StoredFolder

log = logging.getLogger("peftfleet.corda")

# peft's guidance: ~256 samples × 2048 tokens for hidden size 4096, i.e. ~128 tokens per input dimension.
TOKENS_PER_DIM = 128


def calibration_samples(spec: JobSpec) -> tuple[list[list[int]], list[list[int]], int]:
    """(samples for the statistics, held-out samples for the fidelity check, pad id), as token ids."""
    from workers.data.examples import tokenize
    from workers.data.tokenizer import load_tokenizer, pad_id

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


    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    samples, held, pad_id = calibration_samples(ctx.inputs)
    if corda.covariance_from is not None:
        reducers = _start_reducers(ctx, corda.num_workers)
        groups, totals = load_covariance(corda.covariance_from, reducers, node_cache(spec))
        log.info("calibrate: %d input groups loaded from %s; no collection", len(groups), corda.covariance_from)
        tokens = ray.get(reducers[0].tokens.remote(totals[0]))
        ctx.calibration = Calibration(groups=groups, totals=totals, reducers=reducers, held=held, tokens=tokens,
                                      calibrate_s=0.0)
        return
    shards = [samples[i : i + corda.shard_samples] for i in range(0, len(samples), corda.shard_samples)]
    strategy = choose_corda_strategy(spec)
    log.info("calibrate: strategy %s%s", strategy, f" (auto: {corda_memory_reason(spec)})"
             if corda.strategy == "auto" and corda.actor_memory_gib else "")
    collect = collect_layerwise if strategy == "layerwise" else collect_replica
    start = time.perf_counter()
    groups, totals, reducers, summaries, placement, early = collect(ctx, shards, pad_id)
    ctx.record_peak("calibrate", f"covariance actor ({strategy})", (s.peak_memory_mib for s in summaries))
    ctx.calibration = Calibration(groups=groups, totals=totals, reducers=reducers, held=held,
                                  tokens=sum(len(s) for s in samples), calibrate_s=time.perf_counter() - start,
                                  shards=summaries, actors=placement, early=early)


def corda_memory_reason(spec: JobSpec) -> str:
    need, have = replica_bytes(spec), spec.init.corda_spec.actor_memory_gib * 2**30
    return f"a replica needs ~{need / 2**30:.1f} GiB, an actor is given {have / 2**30:.1f} GiB"


def _actor_options(ctx: Context, strategy: str) -> dict:
    """Covariance actors: SPREAD, one replica per node where possible, so losing a node loses the fewest actors.
    Failures are bounded by actor restarts; a call is retried for as long as its actor can come back (a lost
    node makes the actor "unavailable" many times before it is declared dead). Errors raised by our code are never
    retried. Each reserves init.corda.actor_memory_gib, or its planned peak."""
    corda = ctx.spec.init.corda_spec
    memory = ctx.reserve("calibrate", f"covariance actor ({strategy})",
                         corda.actor_memory_gib and corda.actor_memory_gib * 2**30)
    return dict(num_cpus=1, num_gpus=1 if corda.use_gpu else 0, scheduling_strategy="SPREAD",
                max_restarts=corda.max_failures, max_task_retries=-1, **memory)


def _start_reducers(ctx: Context, n: int) -> list:
    """Reducers: one per covariance actor, spread like them, no CPU reservation — their adds are light and must not
    wait behind the actors, and they decompose only after the actors have given their CPUs back. They start
    now, beside the actors: a process start (import torch) during collection would steal the actors' cores.
    Out of order: the fold order lives in the chain of object refs, not in the actor's queue, and an ordered
    actor restarted with its node can stall 30 s waiting for a call sequence number that never comes.
    Since they reserve no CPU, nothing else bounds their number: at most one per CPU of the cluster (groups are
    dealt to them round-robin, so fewer reducers change no result), and each reserves its memory."""
    import ray

    from workers.corda.reduce import Reducer

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if n > cpus:
        log.info("decompose: %d reducers, one per CPU of the cluster (asked for %d)", cpus, n)
        n = cpus
    return [ray.remote(Reducer).options(num_cpus=0, scheduling_strategy="SPREAD", max_restarts=-1,
                                        max_task_retries=-1, allow_out_of_order_execution=True,
                                        **ctx.reserve("decompose", "reducer")).remote()
            for _ in range(n)]


def _placed(actors: list, reducers: list) -> list[tuple[int, str]]:
    placement = wait_all([a.where.remote() for a in actors], fetch=True)
    wait_all([r.ready.remote() for r in reducers], fetch=True)
    for i, (pid, node) in enumerate(placement):
        log.info("calibrate: covariance actor %d is pid %d on node %s", i, pid, node[:12])
    return placement


def _fold(totals: list, g: int, part, reducers: list) -> None:
    """Add one shard's statistics of group g to its running sum; called in shard order per group, so the sum does
    not depend on scheduling."""
    totals[g] = part if totals[g] is None else reducers[g % len(reducers)].add.remote(totals[g], part)


def _decompose(ctx: Context, g: int, group, total, reducers: list, layout: ResidualLayout):
    """Group g's decomposition, on the reducer that produced its sum, writing its residual_base shard."""
    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    key = f"{ctx.artifact_key('residual_base')}/{layout.files[g]}"
    return reducers[g % len(reducers)].decompose.remote(total, group.name, group.modules, str(spec.model.path),
                                                        spec.adapter.r, corda.mode, spec.adapter.alpha / spec.adapter.r,
                                                        corda.damping, spec.model.dtype, spec.storage, key,
                                                        node_cache(spec))


def _save_stats(ctx: Context, g: int, group, total, reducers: list):
    """Group g's reduced sum as the `covariance` artifact's file for it."""
    key = f"{ctx.artifact_key('covariance')}/{group.name}.safetensors"
    return reducers[g % len(reducers)].save_stats.remote(total, ctx.spec.storage, key)


def collect_replica(ctx: Context, shards: list, pad_id: int) -> tuple:
    """N actors, one model replica each, take shards round-robin; each shard's statistics come back whole."""
    import ray

    from workers.corda.covariance import CovarianceWorker

    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    Actor = ray.remote(CovarianceWorker).options(**_actor_options(ctx, "replica"))
    device = "cuda" if corda.use_gpu else "cpu"
    actors = [Actor.remote(str(spec.model.path), spec.model.dtype, corda.covariance_dtype, corda.activation_scale,
                           device, node_cache(spec)) for _ in range(min(corda.num_workers, len(shards)))]
    reducers = _start_reducers(ctx, len(actors))
    placement = _placed(actors, reducers)
    groups = ray.get(actors[0].groups.remote(spec.adapter.target_modules, shards[0][0]))
    log.info("calibrate: %d samples in %d shards on %d actor(s); %d input groups: %s", sum(map(len, shards)),
             len(shards), len(actors), len(groups), ", ".join(f"{g.name}[{len(g.modules)}]" for g in groups))
    totals: list[Any] = [None] * len(groups)
    done_refs = []
    for i, shard in enumerate(shards):
        parts = actors[i % len(actors)].collect.options(num_returns=len(groups) + 1).remote(
            i, shard, groups, corda.batch_size, pad_id)
        done_refs.append(parts[-1])
        for g, part in enumerate(parts[:-1]):
            _fold(totals, g, part, reducers)
    tokens, start = sum(map(len, (s for shard in shards for s in shard))), time.perf_counter()

    def progress(done: int) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(shards) - done) if done else float("nan")
        log.info("calibrate: shard %d/%d, %.0f tokens/s, eta %.0fs", done, len(shards),
                 tokens * done / len(shards) / elapsed, eta)

    summaries = wait_all(done_refs, on_progress=progress, fetch=True)
    wait_all(totals)
    for actor in actors:  # free their CPUs (and GPUs) for the decomposition
        ray.kill(actor)
    return groups, totals, reducers, summaries, placement, Early()


AHEAD = 2  # layer-wise: blocks collected ahead of the last fully folded one


def collect_layerwise(ctx: Context, shards: list, pad_id: int) -> tuple:
    """N actors own fixed shards (i mod N) and walk the decoder blocks together. Blocks are queued up to AHEAD past
    the last fully folded one: block k's folds run while k+1 is collected, and the per-shard statistics waiting
    in the object store stay a couple of blocks' worth, not the whole model's. A folded block is decomposed (and
    its sums saved, if asked) at once, while the next blocks are collected, and its sums are then let go: the
    object store never holds every block's covariance."""
    import ray

    from workers.corda.layerwise import LayerwiseWorker

    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    n = min(corda.num_workers, len(shards))
    owned = [{i: shards[i] for i in range(a, len(shards), n)} for a in range(n)]
    Actor = ray.remote(LayerwiseWorker).options(**_actor_options(ctx, "layerwise"))
    device = "cuda" if corda.use_gpu else "cpu"
    spill = layerwise_spills(spec)
    if spill:
        log.info("calibrate: the actors' hidden states exceed init.corda.actor_memory_gib %g: each keeps only the "
                 "shard at work in memory, the others on its node's disk", corda.actor_memory_gib)
    spills = f"{ctx.job_id}-{secrets.token_hex(8)}"  # unguessable: no one can make the actors' folders first
    actors = [Actor.remote(str(spec.model.path), spec.model.dtype, corda.covariance_dtype, corda.activation_scale,
                           device, own, corda.batch_size, pad_id, node_cache(spec), f"{spills}/actor-{a}", spill)
              for a, own in enumerate(owned)]
    reducers = _start_reducers(ctx, n)
    placement = _placed(actors, reducers)
    per_block = ray.get(actors[0].groups.remote(spec.adapter.target_modules))
    groups = [g for block in per_block for g in block]
    log.info("calibrate: %d samples in %d shards on %d actor(s), layer-wise over %d blocks; %d input groups per "
             "block: %s", sum(map(len, shards)), len(shards), n, len(per_block), len(per_block[0]),
             ", ".join(f"{g.name.rsplit('.', 2)[-2]}.{g.name.rsplit('.', 1)[-1]}[{len(g.modules)}]"
                       for g in per_block[0]))
    totals: list[Any] = [None] * len(groups)
    bounds = [sum(map(len, per_block[:k])) for k in range(len(per_block) + 1)]  # block k's groups: bounds[k:k+2]
    early = Early()
    layout = residual_layout(ctx.inputs, groups) if "decompose" in spec.effective_stages else None
    start = time.perf_counter()

    def folded(k: int) -> None:  # wait for block k's sums (cancellable), then decompose them while k+1.. collect
        wait_all(totals[bounds[k] : bounds[k + 1]])
        for g in range(bounds[k], bounds[k + 1]) if layout else ():
            early.decompositions[g] = _decompose(ctx, g, groups[g], totals[g], reducers, layout)
            if corda.save_covariance:
                early.saved[g] = _save_stats(ctx, g, groups[g], totals[g], reducers)
            if not ctx.keep_sums:  # the calls hold the sum until they have run; then the object store frees it
                totals[g] = None
        elapsed = time.perf_counter() - start
        log.info("calibrate: block %d/%d, eta %.0fs", k + 1, len(per_block),
                 elapsed / (k + 1) * (len(per_block) - k - 1))

    done_refs, base = [], 0
    for k, block_groups in enumerate(per_block):
        if k >= AHEAD:  # block k waits until block k-AHEAD is folded: the per-shard statistics in flight stay bounded
            folded(k - AHEAD)
        parts = {}  # shard → its statistics of this block's groups
        for a, actor in enumerate(actors):
            mine = sorted(owned[a])
            out = actor.block.options(num_returns=len(mine) * len(block_groups) + 1).remote(k, block_groups)
            done_refs.append(out[-1])
            for j, shard in enumerate(mine):
                parts[shard] = out[j * len(block_groups) : (j + 1) * len(block_groups)]
        for shard in range(len(shards)):
            for g, part in enumerate(parts[shard]):
                _fold(totals, base + g, part, reducers)
        base += len(block_groups)
    for k in range(max(0, len(per_block) - AHEAD), len(per_block)):
        folded(k)
    summaries = wait_all(done_refs, fetch=True)
    replayed = sum(s.replayed for s in summaries)
    if replayed:
        log.info("calibrate: restarted actors recomputed %d block(s) of hidden states", replayed)
    ray.get([actor.close.remote() for actor in actors])
    for actor in actors:
        ray.kill(actor)
    return groups, totals, reducers, summaries, placement, early


def run_decompose(ctx: Context) -> None:
    import ray

    from workers.corda.fidelity import init_fidelity

    spec, corda = ctx.spec, ctx.spec.init.corda_spec
    state: Calibration = ctx.needs("calibration")
    groups, totals, reducers, early = state.groups, state.totals, state.reducers, state.early
    residual_prefix = ctx.artifact_key("residual_base")
    layout = residual_layout(ctx.inputs, groups)
    model, dtype, storage = str(spec.model.path), spec.model.dtype, spec.storage
    # Each group is decomposed by the reducer that produced its sum, i.e. where the covariance already is, and its
    # residual weights are written from there into the store; the unchanged tensors are copied by the same pool.
    # Layer-wise calibration already started most of these, block by block.
    started = early.decompositions
    refs = [started[g] if g in started else _decompose(ctx, g, group, totals[g], reducers, layout)
            for g, group in enumerate(groups)]
    copies = [reducers[j % len(reducers)].copy_tensors.remote(model, names, dtype, storage,
                                                              f"{residual_prefix}/{layout.files[len(groups) + j]}",
                                                              node_cache(spec))
              for j, names in enumerate(layout.copied)]
    start = time.perf_counter()
    wait_all(refs + copies, fetch=True,
             on_progress=lambda n: log.info("decompose: %d/%d residual_base shards written", n, len(layout.files)))
    decompose_s = time.perf_counter() - start
    covariance = _save_covariance(ctx, groups, totals, reducers, early) if corda.save_covariance else None
    results, written = [], []
    for ref in refs:  # small: A, B and diagnostics (the residual weights are already in the store)
        result, stored = ray.get(ref)
        results.append(result)
        written.append(stored)
    written += ray.get(copies)
    ctx.record_peak("decompose", "reducer", ray.get([r.peak_memory_mib.remote() for r in reducers]))
    if not ctx.keep_sums:  # the statistics are no longer needed (a sweep's next decomposition would need them)
        for reducer in reducers:
            ray.kill(reducer)
        totals.clear()
    early.decompositions.clear()
    early.saved.clear()
    residual = StoredFolder(residual_prefix, (*write_residual_config(ctx, layout, residual_prefix), *written))
    adapter = write_corda_adapter(ctx, results)
    ctx.published += [residual, adapter] + ([covariance] if covariance else [])
    fidelity = float(model_task(ctx, "decompose", "init-fidelity check", init_fidelity, spec, residual, adapter,
                                state.held))
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
    ctx.corda_init = CordaInit(residual_base=residual, adapter=adapter, fidelity_samples=state.held)
    log.info("decompose: init fidelity max |Δlogits| %.2e (tolerance %.0e)", fidelity, corda.fidelity_tolerance)
    if not fidelity <= corda.fidelity_tolerance:
        raise ValueError(f"init-fidelity check failed: residual base + CorDA adapter changes the logits by up to "
                         f"{fidelity:.3e} (> init.corda.fidelity_tolerance {corda.fidelity_tolerance:.0e}); "
                         "the decomposition is not exact for this model and dtype")


@dataclass(frozen=True)
class ResidualLayout:
    """residual_base's shard files: one per input group (its residual weights), then the unchanged tensors."""

    files: list[str]  # shard file names, groups first
    weight_map: dict[str, str]  # tensor → shard file
    copied: list[list[str]]  # tensor names of each copy-through shard
    total_size: int  # bytes of all tensors in the model's dtype


def residual_layout(spec: JobSpec, groups) -> ResidualLayout:
    """Planned from the base's safetensors headers alone (no tensor data is read here)."""
    import torch

    from workers.storage.weights import DTYPE_BYTES, pack, shard_name, tensor_infos

    infos = tensor_infos(spec.model.path)
    width = torch.empty(0, dtype=getattr(torch, spec.model.dtype)).element_size()
    size = {name: info.nbytes // DTYPE_BYTES[info.dtype] * width for name, info in infos.items()}
    replaced = [[f"{m}.weight" for m in g.modules] for g in groups]
    done = {name for names in replaced for name in names}
    # copy-through shards of at most SHARD_BYTES (transformers' default is 5 GB): smaller files spread the copying
    # over more reducers and bound each one's memory (the plan counts one such shard per reducer)
    copied = pack({n: size[n] for n in infos if n not in done}, SHARD_BYTES)
    files = [shard_name(k, len(replaced) + len(copied)) for k in range(1, len(replaced) + len(copied) + 1)]
    weight_map = {name: file for file, names in zip(files, replaced + copied, strict=True) for name in names}
    return ResidualLayout(files, weight_map, copied, sum(size.values()))


def write_residual_config(ctx: Context, layout: ResidualLayout, prefix: str) -> tuple:
    """The small files of residual_base: config (in the job's dtype), generation config, index, tokenizer."""
    from transformers import AutoConfig, GenerationConfig

    from workers.data.tokenizer import load_tokenizer
    from workers.storage.weights import write_index

    spec = ctx.inputs
    with tempfile.TemporaryDirectory(prefix="peftfleet-residual-") as tmp:
        config = AutoConfig.from_pretrained(spec.model.path)
        config.dtype = spec.model.dtype
        config.save_pretrained(tmp)
        if (Path(spec.model.path) / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(spec.model.path).save_pretrained(tmp)
        write_index(Path(tmp), layout.weight_map, layout.total_size)
        if (tokenizer := load_tokenizer(spec)) is not None:  # a complete model folder, as the base was
            tokenizer.save_pretrained(tmp)
        return ctx.store.publish_folder(prefix, Path(tmp)).files


def write_corda_adapter(ctx: Context, results) -> StoredFolder:
    """corda_init: a stock peft LoRA adapter holding CorDA's A, B — assembled from the small factors alone."""
    from peft import LoraConfig

    from workers.methods.adapter_math import write_adapter

    spec = ctx.spec
    layers = [layer for group in results for layer in group.layers]
    config = LoraConfig(r=spec.adapter.r, lora_alpha=spec.adapter.alpha, lora_dropout=spec.adapter.dropout,
                        target_modules=sorted({layer.name.split(".")[-1] for layer in layers}),
                        init_lora_weights=True, task_type="CAUSAL_LM", base_model_name_or_path=str(spec.model.path))
    tensors = {}
    for layer in layers:
        tensors[f"base_model.model.{layer.name}.lora_A.weight"] = layer.lora_A
        tensors[f"base_model.model.{layer.name}.lora_B.weight"] = layer.lora_B
    with tempfile.TemporaryDirectory(prefix="peftfleet-corda-init-") as tmp:
        config.save_pretrained(tmp)
        write_adapter(Path(tmp), json.loads((Path(tmp) / "adapter_config.json").read_text()), tensors)
        return ctx.store.publish_folder(ctx.artifact_key("corda_init"), Path(tmp))


def _save_covariance(ctx: Context, groups, totals, reducers, early: Early) -> StoredFolder:
    """The reduced sums exactly as decomposed (Σxᵀx and counts), written by the reducers holding them (most of
    them already, during layer-wise calibration), plus the group index written here."""
    import ray

    prefix = ctx.artifact_key("covariance")
    files = [f"{g.name}.safetensors" for g in groups]
    stored = ray.get([early.saved[g] if g in early.saved else _save_stats(ctx, g, group, totals[g], reducers)
                      for g, group in enumerate(groups)])
    index = [{"group": g.name, "modules": list(g.modules), "dim": g.dim, "file": file}
             for g, file in zip(groups, files, strict=True)]
    with tempfile.TemporaryDirectory(prefix="peftfleet-covariance-") as tmp:
        (Path(tmp) / "groups.json").write_text(json.dumps(index, indent=2))
        return StoredFolder(prefix, (*stored, *ctx.store.publish_folder(prefix, Path(tmp)).files))


def load_covariance(folder: Location, reducers, cache: NodeCache) -> tuple[list, list]:
    """Inverse of _save_covariance: (input groups, a reference to each group's sum), in the saved order; each sum
    is read by the reducer that will decompose it (a folder of a bucket: fetched on the reducer's node)."""
    from workers.corda.covariance import InputGroup

    if isinstance(folder, Path):
        folder = folder.resolve()
    try:
        rows = read_json(folder, "groups.json")
    except OSError:
        raise ValueError(f"init.corda.covariance_from: {folder} is not a `covariance` artifact (no groups.json)"
                         ) from None
    groups, totals = [], []
    for i, row in enumerate(rows):
        name = row["file"]
        try:  # the same check as every index's entries: a relative path that stays in the folder
            entry(Path(folder) if isinstance(folder, Path) else Path("."), name, "init.corda.covariance_from")
        except Outside:
            name = None
        file = folder / name if name is not None else None
        if file is None or (isinstance(file, Path) and not file.is_file()):
            raise ValueError(f"init.corda.covariance_from: {folder}/groups.json names {row['file']!r}, which is "
                             f"not a file inside {folder}")
        groups.append(InputGroup(row["group"], tuple(row["modules"]), row["dim"]))
        totals.append(reducers[i % len(reducers)].load_stats.remote(str(file), cache))
    return groups, totals


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
