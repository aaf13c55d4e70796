"""The train stage, per Ray Train worker: a peft adapter on the frozen base, driven by a DeepSpeed ZeRO engine.

Read top to bottom: data (each rank its own shard) → model + adapter → DeepSpeed engine → resume from the last
checkpoint → optimizer steps → eval → checkpoint (reported to Ray Train, which keeps the best by eval loss).

The loss is normalised by the label tokens of the whole global batch (all ranks, all micro-batches of the step),
so N workers × micro-batch b train exactly like 1 worker × N·b: a rank's loss is world·gas·Σ(token losses)/N_global,
and DeepSpeed's averaging over ranks and accumulation steps turns that into Σ/N_global.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobspecs.schema import VIRTUAL_TOKEN_METHODS, JobSpec
from workers.data.examples import IGNORE, check_count, collate, tokenize, tokenize_records
from workers.data.stream import InMemory, Streamed, Unit, units
from workers.data.tokenizer import load_tokenizer, pad_id
from workers.methods.adalora import AdaLoraBudget, add_regulariser
from workers.methods.adapters import peft_config
from workers.methods.bitfit import mark_trainable, save_biases
from workers.model.loss import mean_token_loss, token_loss_sum
from workers.runtime.job_process import start_job_process
from workers.runtime.logs import say
from workers.runtime.process_memory import peak_memory_mib
from workers.storage.inputs import fetch_all, on_node
from workers.storage.node_cache import local_folder
from workers.storage.store import StoredFolder
from workers.train.deepspeed_config import deepspeed_config

CKPT_TAG = "ds"


@dataclass
class TrainState:
    """Where a run is and what it has seen: a checkpoint's state.json, and what the export reads back."""

    step: int = 0
    planned_steps: int = 0  # where the run ends (a sweep's trial stopped early ends before)
    epoch: int = 0  # rank 0's
    positions: list[dict] = field(default_factory=list)  # per rank, where it is in its data (workers/data/stream.py)
    tokens: int = 0
    elapsed: float = 0.0
    metrics: list[dict] = field(default_factory=list)  # one row per optimizer step
    resumed_from: list[int] = field(default_factory=list)  # steps a restarted worker group resumed from
    eval_loss_at_start: float | None = None  # the model before its first optimizer step (where the curve starts)
    nodes: list[str] = field(default_factory=list)  # the Ray node each rank ran on (the latest worker group)
    engine: dict = field(default_factory=dict)  # what DeepSpeed actually ran: ZeRO stage, batch layout, precision
    peak_memory_mib: list[float] = field(default_factory=list)  # per rank, the worker process's peak resident memory

    def save(self, folder: Path) -> None:
        (folder / "state.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> TrainState:
        raw = json.loads((Path(folder) / "state.json").read_text())
        if "cursor" in raw:  # written before positions were per rank: one position, every rank's
            raw["positions"] = [{"epoch": raw["epoch"], "cursor": raw.pop("cursor")}]
        return cls(**raw)

    def position(self, rank: int, world: int) -> dict | None:
        if len(self.positions) == world:
            return self.positions[rank]
        return self.positions[0] if self.positions else None


@dataclass
class TrainResult:
    adapter_files: dict[str, bytes]  # the best checkpoint's adapter folder, file name -> content
    metrics: list[dict] = field(default_factory=list)  # one row per optimizer step
    best_step: int = 0
    best_eval_loss: float | None = None  # the best checkpoint's score: eval loss, or training loss without eval
    eval_loss_at_start: float | None = None  # the model before its first optimizer step (where the curve starts)
    total_steps: int = 0  # steps run
    planned_steps: int = 0
    resumed_from: list[int] = field(default_factory=list)  # steps a restarted worker group resumed from
    nodes: list[str] = field(default_factory=list)  # the Ray node each rank ran on (the latest worker group)
    peak_memory_mib: list[float] = field(default_factory=list)  # per rank, the worker process's peak resident memory
    engine: dict = field(default_factory=dict)  # what DeepSpeed actually ran: ZeRO stage, batch layout, precision


def optimizer_steps(spec: JobSpec, num_examples: int) -> int:
    per_step = spec.train.micro_batch_size * spec.train.grad_accum * spec.train.num_workers
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    return max(1, math.ceil(spec.train.epochs * num_examples / per_step))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def all_gather(value: object) -> list:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def evaluate(engine, examples: list[dict], batch_size: int, pad_id: int, device) -> float:
    """Mean loss per label token over the whole eval set. Every rank runs the same batches (ZeRO-3 gathers
    parameters collectively, so ranks must agree on the number of forward passes)."""
    engine.eval()
    loss = mean_token_loss(engine, examples, batch_size, pad_id, device)
    engine.train()
    return loss


def build_model(spec: JobSpec, corda_init: dict[str, StoredFolder] | None, total_steps: int, zero3: bool,
                base_name: str):
    """The peft model: CorDA's adapter on the residual base (both read from the job's store through this node's
    cache), or the method's own init on the base (`spec`'s inputs are on this node; `base_name` is where the user
    keeps the base, which the adapter's config names).

    Under ZeRO-3 (an `HfDeepSpeedConfig` alive, see setup) the base is built inside `deepspeed.zero.Init` and each
    rank reads only its 1/world slice of every weight from the files (workers/train/partitioned_load.py), so no worker
    ever holds or reads the whole model. The adapter's own (small) parameters are created afterwards as ordinary
    tensors and partitioned by `deepspeed.initialize`."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.train.partitioned_load import partitioned_model

    dtype = getattr(torch, spec.model.dtype)

    def load(folder):
        if zero3:
            return partitioned_model(folder, dtype)
        return AutoModelForCausalLM.from_pretrained(fetch_all(folder), dtype=dtype)

    if corda_init:
        residual, adapter = local_folder(spec, corda_init["residual_base"]), local_folder(spec, corda_init["adapter"])
        base = load(residual)
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    elif spec.adapter.method == "bitfit":  # no peft wrapper: the base itself, its target biases trainable
        model = base = load(spec.model.path)
        mark_trainable(model, spec.adapter.target_modules)
    else:
        base = load(spec.model.path)
        model = get_peft_model(base, peft_config(spec.adapter, total_steps, spec.model.tokenizer_path))
        model.peft_config[model.active_adapter].base_model_name_or_path = base_name
    if spec.train.gradient_checkpointing:
        # non-reentrant: gradients reach the adapter although the checkpointed inputs of a frozen base need none
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU comm backend compiles a shared-memory op with g++ at start (≈22 s, ≈5 GB); gloo through
    Ray's process group needs none of it. Patch the module attribute itself (binding it by `import ... as`
    would bind torch instead)."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def save_adapter(run: Run, out: Path) -> None:
    """The adapter as stock peft saves it (BitFit: workers/methods/bitfit.py). Under ZeRO-3 the parameters are
    partitioned (shape [0] locally), so every rank joins the gather and rank 0 writes the full tensors. Gather by
    adapter name, not requires_grad: peft also saves frozen adapter tensors (AdaLoRA's lora_ranknum).

    The virtual-token methods save the prompt their encoder computes (p-tuning's MLP/LSTM, prefix tuning's
    projection): that forward runs on every rank, since under ZeRO-3 a forward is collective — run on rank 0 alone
    inside peft's save, it left the ranks' collectives out of step and the next step hung."""
    import deepspeed

    is_rank0, model = run.rank == 0, run.engine.module
    if run.spec.adapter.method == "bitfit":
        save_biases(model, out, run.base_name, run.spec.adapter.target_modules, is_rank0)
        return
    name = model.active_adapter
    adapter = [p for n, p in model.named_parameters() if f".{name}." in f".{n}."]
    with deepspeed.zero.GatheredParameters(adapter, modifier_rank=None):
        if run.spec.adapter.method in VIRTUAL_TOKEN_METHODS:
            with torch.no_grad():
                prompt = model.get_prompt_embedding_to_save(name)
            model.get_prompt_embedding_to_save = lambda adapter_name: prompt  # what peft's save asks for
        try:
            if is_rank0:
                model.save_pretrained(out)
        finally:
            model.__dict__.pop("get_prompt_embedding_to_save", None)


@dataclass
class Run:
    """What a worker sets up once: its place in the group, its data, its DeepSpeed engine."""

    spec: JobSpec
    rank: int
    world: int
    device: torch.device
    pad: int
    train_set: list[dict] | list[Unit]  # tokenized examples, or the units of a streamed source
    tokenize_unit: Callable[[list[dict], str], list[dict]]  # a streamed unit's records → examples (checked)
    eval_set: list[dict]
    total: int  # optimizer steps
    engine: Any
    scheduler: Any
    budget: AdaLoraBudget | None
    nodes: list[str]
    zero3_config: Any  # transformers' HfDeepSpeedConfig under ZeRO-3 (held: it is read through a weak reference)
    base_name: str  # where the user keeps the base model (the adapter's config names it)
    partitioned_load: bool  # the base was loaded partitioned (ZeRO-3): no rank held it whole
    label: str = "train"  # what its progress lines start with: "train", or a sweep's "trial <name>"

    @property
    def micro(self) -> int:
        return self.engine.train_micro_batch_size_per_gpu()

    @property
    def gas(self) -> int:
        return self.engine.gradient_accumulation_steps()


def setup(spec: JobSpec, corda_init: dict[str, StoredFolder] | None, label: str = "train") -> Run:
    """Device, data (the same tokenization everywhere), model + adapter, DeepSpeed engine; logs the start-up."""
    began, phases = time.perf_counter(), {}  # start-up seconds per phase, shown in the first progress line

    def phase_done(name: str) -> None:
        phases[name] = time.perf_counter() - began - sum(phases.values())

    cfg = spec.train
    # tell DeepSpeed, rather than have it probe for an accelerator and warn on every worker
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    import deepspeed
    import ray.train
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    ctx = ray.train.get_context()
    start_job_process()
    if cfg.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        skip_cpu_shm_build()
    torch.manual_seed(cfg.seed)
    phase_done("imports")
    base_name, spec = str(spec.model.path), on_node(spec)  # inputs in a bucket: fetched once per node
    tokenizer = load_tokenizer(spec)
    vocab = AutoConfig.from_pretrained(spec.model.path).vocab_size

    def tokenize_unit(records: list[dict], where: str) -> list[dict]:
        return tokenize_records(records, where, tokenizer, spec.data, vocab_size=vocab)

    if spec.data.streaming:  # read unit by unit as training draws them (workers/data/stream.py)
        train_set = units(spec.data.train.path)
    else:
        train_set = tokenize(spec.data.train, tokenizer, spec.data, vocab_size=vocab)
        check_count(train_set, spec.data.train, ctx.get_world_size())
    eval_set = tokenize(spec.data.eval, tokenizer, spec.data, vocab_size=vocab) if spec.data.eval else []
    total = optimizer_steps(spec, len(train_set))
    phase_done("data")
    ds_config = deepspeed_config(spec, ctx.get_world_size())
    # Under ZeRO-3, transformers and peft act as under HF's Trainer: models are built partitioned, peft gathers
    # what it must. They read this through a weak reference, so the run keeps it for its whole life.
    zero3 = HfDeepSpeedConfig(ds_config) if ds_config.get("zero_optimization", {}).get("stage") == 3 else None
    if zero3 is not None:  # zero.Init inside from_pretrained sizes the batch by DeepSpeed's world: join it first
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    model = build_model(spec, corda_init, total, zero3 is not None, base_name)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters() if not p.requires_grad)
    phase_done("model")
    if spec.adapter.method == "adalora":
        add_regulariser(model, zero3=ds_config.get("zero_optimization", {}).get("stage", 0) == 3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    budget = AdaLoraBudget(engine, ds_config) if spec.adapter.method == "adalora" else None
    run = Run(spec=spec, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
              pad=pad_id(spec, tokenizer), train_set=train_set, tokenize_unit=tokenize_unit, eval_set=eval_set,
              total=total, engine=engine,
              scheduler=scheduler, budget=budget, nodes=all_gather(ray.get_runtime_context().get_node_id()),
              zero3_config=zero3, base_name=base_name, partitioned_load=partitioned, label=label)
    phase_done("engine")
    if run.rank == 0:
        if budget and budget.config.tinit + budget.config.tfinal >= budget.config.total_step:
            say(f"{run.label}: warning: adapter.adalora tinit {budget.config.tinit} + tfinal "
                f"{budget.config.tfinal} leave no step of the {budget.config.total_step} for rank reallocation; "
                "ranks will not change")
        data = (f"{len(train_set)} streamed units (files, row groups)" if spec.data.streaming else
                f"{len(train_set)} examples")
        say(f"{run.label}: {data}, {total} optimizer steps, {run.world} worker(s) on "
            f"{len(set(run.nodes))} node(s) × micro-batch {run.micro} × accumulation {run.gas}, "
            f"ZeRO-{engine.zero_optimization_stage()}, {sum(getattr(p, 'ds_numel', p.numel()) for p in params):,} "
            "trainable parameters "
            f"({spec.adapter.method}); worker start-up {sum(phases.values()):.1f}s "
            f"({', '.join(f'{k} {v:.1f}s' for k, v in phases.items())})")
    return run


def resume(run: Run) -> TrainState:
    """Engine, optimizer and scheduler from DeepSpeed's checkpoint, data position and history from state.json."""
    import ray.train

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            run.engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG, load_module_strict=False)
            state = TrainState.load(Path(ckpt_dir))
        state.resumed_from.append(state.step)
        if run.rank == 0:
            say(f"{run.label}: resumed from step {state.step} (epoch {state.epoch})")
    engine = run.engine
    state.nodes = run.nodes
    state.engine = {"zero_stage": engine.zero_optimization_stage(), "world_size": run.world,
                    "micro_batch_size": run.micro, "grad_accum": run.gas, "bf16": engine.bfloat16_enabled(),
                    "fp16": engine.fp16_enabled(), "partitioned_load": run.partitioned_load}
    return state


def training_data(run: Run, state: TrainState) -> InMemory | Streamed:
    """This rank's examples from where its checkpointed position left them (the start, in a new run)."""
    position, seed = state.position(run.rank, run.world), run.spec.train.seed
    if run.spec.data.streaming:
        return Streamed(run.train_set, run.tokenize_unit, run.rank, run.world, seed, position)
    return InMemory(run.train_set, run.rank, run.world, seed, position)


def draw_batches(run: Run, state: TrainState, data: InMemory | Streamed) -> list[dict]:
    """This step's micro-batches from this rank's data (a new epoch reshuffles it)."""
    batches = []
    for _ in range(run.gas):
        batch = collate(data.take(run.micro), run.pad)
        batches.append({k: v.to(run.device) for k, v in batch.items()})
    state.epoch = data.epoch
    return batches


def micro_step(run: Run, batch: dict, scale: float, allocate: bool, step: int) -> float:
    """Forward + backward + engine step of one micro-batch; returns its summed token loss. A function of its own so
    that the loss, and with it the micro-batch's whole autograd graph, is gone before the next forward: a loss kept
    until it is rebound held one graph through the next step (+0.27× the model of peak and resident memory per
    ZeRO-3 worker, measured on a 400 MB model with 2 workers)."""
    engine, budget = run.engine, run.budget
    loss_sum, _, regulariser = token_loss_sum(engine, batch)
    loss = loss_sum * scale
    if regulariser is not None:
        loss = loss + regulariser
    engine.backward(loss)
    if budget and allocate:
        budget.allocate(step)
    engine.step()
    return float(loss_sum.detach())


def optimizer_step(run: Run, state: TrainState, data: InMemory | Streamed, start: float) -> dict:
    """One optimizer step, the loss normalised by the step's global label-token count (so its micro-batches are
    drawn first); returns its metrics row."""
    step_start, engine, budget = time.perf_counter(), run.engine, run.budget
    batches = draw_batches(run, state, data)
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    global_tokens, seen = all_sum([local_tokens, sum(int(b["attention_mask"].sum()) for b in batches)])
    step_loss = 0.0
    for i, batch in enumerate(batches):
        step_loss += micro_step(run, batch, run.world * run.gas / max(global_tokens, 1), allocate=i == run.gas - 1,
                                step=state.step)
    if budget:
        budget.enforce()
    state.step += 1
    state.tokens += int(seen)
    (loss,) = all_sum([step_loss])
    row = {"step": state.step, "loss": loss / max(global_tokens, 1), "lr": run.scheduler.get_last_lr()[0],
           "grad_norm": float(engine.get_global_grad_norm() or 0.0), "epoch": state.epoch,
           "tokens": int(seen), "step_s": time.perf_counter() - step_start,
           "tokens_per_s": state.tokens / (time.perf_counter() - start)}
    if budget:
        row["ranks"] = budget.ranks()
    return row


def progress_line(run: Run, row: dict, elapsed: float) -> str:
    done, total = row["step"], run.total
    extra = f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
    if "ranks" in row:
        ranks = row["ranks"].values()
        extra += f" ranks {sum(ranks)} ({min(ranks)}-{max(ranks)} per layer)"
    return (f"{run.label}: step {done}/{total} loss {row['loss']:.4f}{extra} lr {row['lr']:.2e} "
            f"grad_norm {row['grad_norm']:.3f} tok/s {row['tokens_per_s']:.0f} "
            f"eta {elapsed / done * (total - done):.0f}s")


def save_checkpoint(run: Run, state: TrainState, data: InMemory | Streamed, score: dict) -> None:
    """DeepSpeed's shards (each rank its own), the gathered adapter and state.json (with every rank's data
    position), reported to Ray Train."""
    import ray.train
    import ray.util
    from ray.train import Checkpoint

    state.peak_memory_mib = [float(m) for m in all_gather(peak_memory_mib())]
    state.positions = all_gather(data.position())
    with tempfile.TemporaryDirectory() as tmp:
        run.engine.save_checkpoint(tmp, tag=CKPT_TAG, exclude_frozen_parameters=True)
        save_adapter(run, Path(tmp) / "adapter")
        if run.rank == 0:
            state.save(Path(tmp))
        # One folder name for all ranks: each uploads its own DeepSpeed shards into the same checkpoint.
        # The worker group's placement group travels with the report: a sweep's driver releases it when Ray Tune
        # stops the trial (Ray Train's own cleaner needs the dashboard's state API, which an embedded Ray lacks).
        group = ray.util.get_current_placement_group()
        ray.train.report({"step": state.step, **score, **({"placement_group": group.id.hex()} if group else {})},
                         checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{state.step:07d}")


def train_worker(config: dict) -> None:
    run = setup(config["spec"], config.get("corda_init"), config.get("label", "train"))
    cfg, state = run.spec.train, resume(run)
    data = training_data(run, state)
    score_key = "eval_loss" if run.eval_set else "loss"
    ckpt_every = cfg.checkpoint_every or cfg.eval_every or run.total
    if run.eval_set and state.eval_loss_at_start is None:  # once per job: a resumed run has it from its checkpoint
        state.eval_loss_at_start = evaluate(run.engine, run.eval_set, run.micro, run.pad, run.device)
        if run.rank == 0:
            say(f"{run.label}: step 0/{run.total} eval_loss {state.eval_loss_at_start:.4f} (before the first step)")
    start = time.perf_counter() - state.elapsed
    state.planned_steps = run.total
    run.engine.train()
    while state.step < run.total:
        row = optimizer_step(run, state, data, start)
        done = state.step
        last = done == run.total
        checkpoint_now = last or done % ckpt_every == 0
        if run.eval_set and (checkpoint_now or (cfg.eval_every and done % cfg.eval_every == 0)):
            row["eval_loss"] = evaluate(run.engine, run.eval_set, run.micro, run.pad, run.device)
        state.metrics.append(row)
        if run.rank == 0 and (last or done % cfg.log_every == 0):
            say(progress_line(run, row, time.perf_counter() - start))
        if checkpoint_now:
            state.elapsed = time.perf_counter() - start
            # A diverged run ranks last: NaN compares false, so Ray Train (and a sweep's ASHA) would keep it.
            score = {key: row[key] if math.isfinite(row[key]) else math.inf for key in ("loss", score_key)}
            save_checkpoint(run, state, data, score)


def read_result(best_dir: Path, latest_dir: Path, score_key: str) -> TrainResult:
    """The export's input: the adapter from the best checkpoint, the metrics history from the latest."""
    best, latest = TrainState.load(best_dir), TrainState.load(latest_dir)
    adapter = Path(best_dir) / "adapter"
    return TrainResult(adapter_files={p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()},
                       metrics=latest.metrics, best_step=best.step, best_eval_loss=best.metrics[-1].get(score_key),
                       eval_loss_at_start=latest.eval_loss_at_start, total_steps=latest.step,
                       planned_steps=latest.planned_steps,
                       resumed_from=latest.resumed_from, nodes=latest.nodes, peak_memory_mib=latest.peak_memory_mib,
                       engine=latest.engine)
