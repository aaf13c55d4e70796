"""Models bigger than any worker: memory per process, stage by stage, on a Llama of 1.6 GB of fp32 weights.

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_memory.py)

One run, one machine. Every process measures its own peak (resident memory without the object store's shared
pages, sampled every 10 ms: workers/runtime/process_memory.py); peft's single-process CorDA runs in a fresh process
measured the same way. Calibration strategies are compared in one Ray session with the same 2 workers; the
end-to-end jobs (layer-wise CorDA → ZeRO-3 train → export) run through `peftfleet submit` like a user's, on this
model and on one 4× smaller, and their records give every process's peak, which is set against `peftfleet plan`.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import ray

from jobspecs import parse_spec
from jobspecs.load import load_spec
from jobspecs.memory import plan
from orchestrator.stages.context import Context
from orchestrator.stages.corda import run_calibrate, run_decompose
from tests.benchmarks.peft_corda import TARGETS, peft_calibrated
from tests.benchmarks.small_llama import build_model, token_samples
from tests.helpers import cli, write_spec
from workers.storage.store import LocalStore

BIG, SMALL = (1024, 2752), (512, 1376)  # hidden, intermediate: 4× the parameters
LAYERS, VOCAB, SEQ, SAMPLES, BATCH, R = 32, 2048, 64, 16, 4, 16


def peft_corda(model_path: str, data_path: str, out: str) -> dict:
    """peft's own path in one process: covariance (batch 1), decomposition, residual model written."""
    from peft import get_peft_model
    from peft.tuners.lora.corda import collect_eigens, crop_corda_eigens

    from workers.runtime.process_memory import bound_process_memory, peak_memory_mib

    bound_process_memory()
    samples = [json.loads(line)["input_ids"] for line in Path(data_path).read_text().splitlines()]
    model, config, calibrate_s = peft_calibrated(model_path, samples, R)
    t0 = time.perf_counter()
    collect_eigens(model, config, verbose=False)
    crop_corda_eigens(model, config)
    residual = get_peft_model(model, config).unload()  # CorDA's init leaves W − BA in the base
    residual.save_pretrained(out)
    return {"calibrate_s": calibrate_s, "decompose_s": time.perf_counter() - t0, "peak_mib": peak_memory_mib()}


def calibration_spec(model: Path, data: Path, store: Path, strategy: str, targets: list[str] = TARGETS) -> dict:
    return {"name": "bench-memory", "model": {"path": str(model)},
            "data": {"format": "tokens", "train": str(data), "eval": str(data), "calibration": str(data),
                     "max_seq_len": SEQ},
            "adapter": {"r": R, "alpha": 2 * R, "target_modules": targets},
            "init": {"method": "corda", "corda": {"samples": SAMPLES, "seq_len": SEQ, "batch_size": BATCH,
                                                  "num_workers": 2, "shard_samples": 4, "strategy": strategy,
                                                  "fidelity_samples": 2, "fidelity_tolerance": 1.0}},
            "storage": {"uri": f"file://{store}"}, "cluster": {"num_cpus": 2}}


def calibrate(tmp: Path, model: Path, data: Path, strategy: str, decompose: bool, **corda) -> Context:
    raw = calibration_spec(model, data, tmp / "store", strategy)
    raw["init"]["corda"].update(corda)
    spec = parse_spec({**raw, "stages": ["calibrate", "decompose"]})
    if not decompose:  # collection alone: without a decompose stage layer-wise calibration starts no decomposition
        spec = spec.model_copy(update={"stages": ["calibrate"]})  # (a spec refuses this: its sums would be lost)
    ctx = Context(job_id=f"bench-{strategy}", spec=spec, store=LocalStore(tmp / "store"), staging=tmp / strategy)
    run_calibrate(ctx)
    if decompose:
        run_decompose(ctx)
    else:
        for reducer in ctx.calibration.reducers:
            ray.kill(reducer)
    return ctx


@ray.remote(num_cpus=1)
def idle_process() -> float:
    """A job process that has imported what every stage imports, and done nothing."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from workers.runtime.process_memory import bound_process_memory, peak_memory_mib

    bound_process_memory()
    time.sleep(0.1)
    return peak_memory_mib()


def full_job(tmp: Path, model: Path, data: Path) -> tuple[dict, list]:
    """Layer-wise CorDA (auto: a replica does not fit 1 GiB) → ZeRO-3 train → export, through the CLI. Two target
    layers per block, the smallest and the largest input (the decomposition's speed is measured above)."""
    tmp.mkdir(parents=True)
    spec = calibration_spec(model, data, tmp / "store", "auto", targets=["q_proj", "down_proj"])
    spec["init"]["corda"]["actor_memory_gib"] = 1.0
    spec["train"] = {"num_workers": 2, "zero_stage": 3, "max_steps": 3, "micro_batch_size": 2, "eval_every": 3,
                     "learning_rate": 1e-3}
    spec["export"] = {"formats": ["adapter", "merged"], "merge_alphas": [1.0], "wise_ft_alphas": [0.0, 1.0]}
    spec["cluster"]["node_cache_dir"] = str(tmp / "cache")
    path = write_spec(tmp / "job.yaml", spec)
    job_id = cli(tmp / "state", "submit", path, "--wait", timeout=1800, check=True).stdout.strip()
    record = json.loads(cli(tmp / "state", "status", job_id, "--json", check=True).stdout)
    return {s["name"]: s["peak_memory_mib"] for s in record["stages"]}, plan(load_spec(path))["processes"]


@pytest.mark.benchmark
def test_bench_memory(tmp_path):
    data = tmp_path / "tokens.jsonl"
    samples = token_samples(data, SAMPLES, SEQ, VOCAB)
    tokens = sum(len(s) for s in samples)
    models = {}
    for name, (hidden, intermediate) in (("big", BIG), ("small", SMALL)):
        models[name] = tmp_path / name
        build_model(models[name], hidden, LAYERS, intermediate, VOCAB, SEQ, max_shard_size="400MB")
    model_mib = {n: sum(f.stat().st_size for f in m.glob("*.safetensors")) / 2**20 for n, m in models.items()}

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        peft = pool.submit(peft_corda, str(models["big"]), str(data), str(tmp_path / "peft-residual")).result()

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=2 * 1024**3,
             configure_logging=False)
    try:
        floor = max(ray.get([idle_process.remote() for _ in range(2)]))
        replica = calibrate(tmp_path / "replica", models["big"], data, "replica", decompose=False)
        layerwise = calibrate(tmp_path / "layerwise", models["big"], data, "layerwise", decompose=False)
        pipelined = calibrate(tmp_path / "pipelined", models["big"], data, "layerwise", decompose=True,
                              save_covariance=True)
        # decomposition alone (layer-wise calibration overlaps it with collection): from the saved covariance
        saved = pipelined.store.root / "jobs" / pipelined.job_id / "artifacts" / "covariance"
        alone = calibrate(tmp_path / "alone", models["big"], data, "layerwise", decompose=True,
                          covariance_from=str(saved))
    finally:
        ray.shutdown()
    decompose_s = json.loads((alone.staging / "report" / "corda.json").read_text())["decompose_s"]
    pipelined_s = pipelined.calibration.calibrate_s + json.loads(
        (pipelined.staging / "report" / "corda.json").read_text())["decompose_s"]
    actor = {c: ctx.peaks["calibrate"][f"covariance actor ({c})"] for c, ctx in
             (("replica", replica), ("layerwise", layerwise))}

    big, predicted = full_job(tmp_path / "job-big", models["big"], data)
    small, _ = full_job(tmp_path / "job-small", models["small"], data)
    size = model_mib["big"]
    train = big["train"]["training worker (ZeRO-3)"]
    rows = [
        ("model weights, fp32 (MiB): this model / the 4× smaller one",
         f"{size:,.0f} / {model_mib['small']:,.0f}", ""),
        ("idle job process: torch + transformers + Ray (MiB)", f"{floor:,.0f}", f"{floor / size:.2f}"),
        ("peak per covariance actor ÷ model, replica, 2 workers", f"{actor['replica']:,.0f} MiB",
         f"{actor['replica'] / size:.2f}"),
        ("peak per covariance actor ÷ model, layerwise, 2 workers (target ≤ 0.25)", f"{actor['layerwise']:,.0f} MiB",
         f"{actor['layerwise'] / size:.2f}"),
        ("  the same above the idle process", f"{actor['layerwise'] - floor:,.0f} MiB",
         f"{(actor['layerwise'] - floor) / size:.2f}"),
        ("peak per training worker ÷ model, ZeRO-3, 2 workers (target ≤ 0.7)", f"{train:,.0f} MiB",
         f"{train / size:.2f}"),
        ("  the same above the idle process", f"{train - floor:,.0f} MiB", f"{(train - floor) / size:.2f}"),
        ("driver peak, this model vs the 4× smaller (target ≤ 1.1×)",
         f"{big['upload']['driver']:,.0f} / {small['upload']['driver']:,.0f} MiB",
         f"{big['upload']['driver'] / small['upload']['driver']:.2f}×"),
        ("peft single process, calibration + decomposition (MiB)", f"{peft['peak_mib']:,.0f}",
         f"{peft['peak_mib'] / size:.2f}"),
        ("calibration tokens/s, replica, 2 workers", f"{tokens / replica.calibration.calibrate_s:,.0f}", "1.00×"),
        ("calibration tokens/s, layerwise, 2 workers (target ≥ 0.8×)",
         f"{tokens / layerwise.calibration.calibrate_s:,.0f}",
         f"{replica.calibration.calibrate_s / layerwise.calibration.calibrate_s:.2f}×"),
        ("calibration tokens/s, peft (1 process, batch 1)", f"{tokens / peft['calibrate_s']:,.0f}",
         f"{replica.calibration.calibrate_s / peft['calibrate_s']:.2f}×"),
        ("decomposition + residual writing (s), peft sequential", f"{peft['decompose_s']:.1f}", "1.00×"),
        ("decomposition + residual writing (s), peftfleet 2 reducers (target ≥ 1.6×)", f"{decompose_s:.1f}",
         f"{peft['decompose_s'] / decompose_s:.2f}×"),
        ("calibration + decomposition (s), peft sequential", f"{peft['calibrate_s'] + peft['decompose_s']:.1f}",
         "1.00×"),
        ("calibration + decomposition (s), layer-wise, each block decomposed while the next is collected",
         f"{pipelined_s:.1f}", f"{(peft['calibrate_s'] + peft['decompose_s']) / pipelined_s:.2f}×"),
        ("peak of the init-fidelity check ÷ model (walked)", f"{big['decompose']['init-fidelity check']:,.0f} MiB",
         f"{big['decompose']['init-fidelity check'] / size:.2f}"),
        ("peak of the export task ÷ model (conversion check, Wise-FT walks, merged@1 streamed)",
         f"{big['export']['export task']:,.0f} MiB", f"{big['export']['export task'] / size:.2f}"),
    ]
    print(f"\nMemory benchmark: Llama hidden {BIG[0]}, {LAYERS} layers, intermediate {BIG[1]}, vocab {VOCAB}, "
          f"{size:,.0f} MiB fp32 in 400 MB shards; CorDA on {SAMPLES} × ≤{SEQ} tokens, r={R}, all 7 linear layers")
    print("| measure | value | ratio |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print("\n`peftfleet plan` vs measured peak, per process (the end-to-end job on this model)\n"
          "| stage | process | plan (MiB) | measured (MiB) | plan ÷ measured |\n|---|---|---|---|---|")
    for p in predicted:
        measured = big[p["stage"]][p["process"]]
        print(f"| {p['stage']} | {p['process']} | {p['total_bytes'] / 2**20:,.0f} | {measured:,.0f} | "
              f"{p['total_bytes'] / 2**20 / measured:.2f} |")
    for stage, kinds in big.items():
        print(f"| {stage} | driver | 0 (no model) | {kinds['driver']:,.0f} | |")
    assert actor["layerwise"] < actor["replica"]
    assert big["upload"]["driver"] < 1.1 * small["upload"]["driver"]
