"""The memory model of a job: bytes each process holds, per stage, from the spec and the model's config.json alone.

No weights are read (a model folder holding only config.json is enough), so a 70B job can be planned on a laptop.
The model is Llama-family (q/k/v/o, gate/up/down; GQA; tied or untied embeddings). Every figure is an estimate of
peak resident memory per process: the tensors it must hold, a working set for one forward pass, and a runtime
floor (Python + torch + transformers + Ray worker, measured ~0.4 GiB on CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobspecs.remote import Location, read_json
from jobspecs.schema import VIRTUAL_TOKEN_METHODS, JobSpec

GIB = 2**30
SHARD_BYTES = 2 * GIB  # the shards we write: residual_base's copied tensors, merged@α (workers/export/formats.py)
WALK_HIDDEN_BYTES = GIB  # a walked eval holds at most this much of its examples' hidden states (block_walk.eval_loss)
RUNTIME_BYTES = int(0.45 * GIB)  # a job process at work: interpreter, torch, transformers, Ray's core worker
REDUCER_RUNTIME_BYTES = int(0.3 * GIB)  # a reducer imports torch and safetensors, not transformers
PLAN_TOLERANCE = 0.25  # how far a planned peak may be from the measured one (held by tests/test_driver_memory.py)
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
# the input tensor each projection reads: q/k/v share one, gate/up share one (peftfleet's input groups)
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, folder: Location) -> Shape:
        file = f"{folder}/config.json"
        try:
            c = read_json(folder, "config.json")
            heads = c["num_attention_heads"]
            return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
                       c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads,
                       c["vocab_size"], bool(c.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise ValueError(f"{file}: no {e.args[0]!r}; the planner reads Llama-family configs (hidden_size, "
                             "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{file}: not readable as a config.json ({e})") from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one block."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}

    @property
    def block_params(self) -> int:
        return sum(i * o for i, o in self.linears().values()) + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embed_params * (1 if self.tied else 2) + self.hidden


def targeted(spec: JobSpec, shape: Shape) -> list[str]:
    targets = spec.adapter.target_modules
    return [n for n in shape.linears() if targets == "all-linear" or n in targets]


def targeted_params(spec: JobSpec, shape: Shape) -> int:
    """Parameters of the weights the adapter targets, over all blocks."""
    linears = shape.linears()
    return shape.layers * sum(linears[n][0] * linears[n][1] for n in targeted(spec, shape))


def group_dims(spec: JobSpec, shape: Shape) -> dict[str, int]:
    """Input dimension of each input group of one block that the adapter targets."""
    linears = shape.linears()
    return {GROUP_OF[n]: linears[n][0] for n in targeted(spec, shape)}


@dataclass
class Process:
    """One kind of process of a stage and what it holds, in bytes."""

    stage: str
    process: str
    count: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _activations(shape: Shape, tokens: int, width: int) -> int:
    """One forward pass's working set without autograd: a few hidden-sized and one intermediate-sized tensor per
    token, plus the attention scores of one sequence."""
    return tokens * (4 * shape.hidden + 2 * shape.intermediate) * width


SPILLED = "hidden states of one shard (the others on node disk)"


def layerwise_spills(spec: JobSpec) -> bool:
    """Whether the calibrate stage's layer-wise actors spill hidden states (see spill_hidden_states)."""
    return SPILLED in calibrate_processes(spec, Shape.from_config(spec.model.path), "layerwise")[0].parts


def spill_hidden_states(spec: JobSpec, layerwise_parts: dict[str, int]) -> bool:
    """Whether layer-wise actors keep only the shard at work in memory and the others' hidden states on the node's
    disk (they are checkpointed there after every block anyway): when all of them would not fit
    init.corda.actor_memory_gib."""
    memory = spec.init.corda_spec.actor_memory_gib
    return memory is not None and sum(layerwise_parts.values()) + RUNTIME_BYTES > memory * GIB


def calibrate_processes(spec: JobSpec, shape: Shape, strategy: str) -> list[Process]:
    corda = spec.init.corda_spec
    width, acc = DTYPE_BYTES[spec.model.dtype], DTYPE_BYTES[corda.covariance_dtype]
    dims = group_dims(spec, shape)
    cov_block = sum(d * d for d in dims.values()) * acc
    batch_tokens = corda.batch_size * corda.seq_len
    # the hook's copies of one group input in the accumulator dtype (x, x/scale, the real rows)
    hook = 3 * batch_tokens * max(dims.values(), default=0) * acc
    samples = corda.samples
    shards = -(-samples // corda.shard_samples)
    workers = max(1, min(corda.num_workers, shards))
    if strategy == "replica":
        parts = {"weights (whole model)": shape.params * width,
                 "covariance, every group of every block": shape.layers * cov_block,
                 "activations (one batch)": _activations(shape, batch_tokens, width) + hook}
    else:
        own_shards = -(-shards // workers)
        own_samples = min(samples, own_shards * corda.shard_samples)
        per_sample = corda.seq_len * shape.hidden * width
        parts = {"weights (one block, or the embeddings)": max(shape.block_params, shape.embed_params) * width,
                 "covariance, this block's groups × own shards": cov_block * own_shards,
                 "hidden states of own samples": own_samples * per_sample,
                 "activations (one batch)": _activations(shape, batch_tokens, width) + hook}
        if spill_hidden_states(spec, parts):
            del parts["hidden states of own samples"]
            parts[SPILLED] = min(samples, corda.shard_samples) * per_sample
    parts["runtime"] = RUNTIME_BYTES
    untouched = (shape.params - targeted_params(spec, shape)) * width
    reducer = {"one group's covariance ×3 (sum, damped inverse, work)": 3 * max(dims.values(), default=0) ** 2 * 4,
               "one group's weights + residual": 2 * max(d * o for n, (d, o) in shape.linears().items()
                                                          if n in targeted(spec, shape)) * 4,
               # the untargeted tensors are copied into residual_base in shards of at most 2 GiB, one per call
               "one copy-through shard": min(untouched, SHARD_BYTES),
               "runtime": REDUCER_RUNTIME_BYTES}
    return [Process("calibrate", f"covariance actor ({strategy})", workers, parts),
            Process("decompose", "reducer", workers, reducer),
            Process("decompose", "init-fidelity check", 1, walked_check(spec, shape))]


def walked_check(spec: JobSpec, shape: Shape) -> dict[str, int]:
    """A logit check walked block by block in fp32 (workers/model/block_walk.py): a block of each model, both heads at
    the end, one sample's logits of each."""
    corda = spec.init.corda_spec
    seq = corda.seq_len
    return {"one block of each model (fp32)": 2 * shape.block_params * 4,
            "embeddings, then both heads (fp32)": 2 * shape.embed_params * 4,
            "hidden states of the samples, both models": 2 * corda.fidelity_samples * seq * shape.hidden * 4,
            "one sample's logits, both models": 2 * seq * shape.vocab * 4 + _activations(shape, seq, 4),
            "runtime": RUNTIME_BYTES}


def eval_records(spec: JobSpec) -> int | None:
    """How many eval examples the job has, where that costs no parsing: `limit`, or a .jsonl file's lines."""
    source = spec.data.eval
    if source is None:
        return 0
    if source.limit:
        return source.limit
    if isinstance(source.path, Path) and source.path.suffix == ".jsonl" and source.path.is_file():
        with source.path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def export_process(spec: JobSpec, shape: Shape) -> Process:
    """The export task, one step after another, so its peak is its heaviest step's: CorDA's conversion check and
    the Wise-FT sweep walk the models block by block, the merges stream one shard at a time; the adapter alone
    loads nothing."""
    width, export = DTYPE_BYTES[spec.model.dtype], spec.export
    delta = spec.adapter.method not in VIRTUAL_TOKEN_METHODS
    steps = [{"runtime": RUNTIME_BYTES}]
    if spec.init.method == "corda":
        steps.append(walked_check(spec, shape))
    if delta and export.wise_ft_alphas and spec.data.eval is not None:
        seq, n = spec.data.max_seq_len, eval_records(spec)
        hidden = WALK_HIDDEN_BYTES if n is None else n * seq * shape.hidden * 4
        batch = spec.train.micro_batch_size * seq
        steps.append({"one block and its merged weights (fp32)": 2 * shape.block_params * 4,
                      "embeddings, then the head (fp32)": shape.embed_params * 4,
                      "hidden states of the eval examples (at most 1 GiB a walk)": min(hidden, WALK_HIDDEN_BYTES),
                      "one eval batch's logits": 2 * batch * shape.vocab * 4 + _activations(shape, batch, 4),
                      "runtime": RUNTIME_BYTES})
    if delta and "merged" in export.formats:  # streamed module by module (workers/methods/merged_weights.py)
        module = max(shape.embed_params, max(i * o for i, o in shape.linears().values()))
        steps.append({"one module of the base and its merged copy": 2 * module * width, "runtime": RUNTIME_BYTES})
    return Process("export", "export task", 1, max(steps, key=lambda parts: sum(parts.values())))


def train_process(spec: JobSpec, shape: Shape) -> Process:
    cfg = spec.train
    width = DTYPE_BYTES[spec.model.dtype]
    world = cfg.num_workers
    linears = shape.linears()
    r = spec.adapter.r
    adapter = shape.layers * sum(r * (i + o) for n, (i, o) in linears.items() if n in targeted(spec, shape))
    weights = shape.params * width // (world if cfg.zero_stage == 3 else 1)
    shard = 1 if cfg.zero_stage == 0 else world  # optimizer state is partitioned from ZeRO-1 on
    tokens = cfg.micro_batch_size * spec.data.max_seq_len
    # autograd keeps ~16 hidden-sized + 4 intermediate-sized values per token and block for backward; with
    # checkpointing only each block's input, plus one block's worth while it is recomputed
    block = tokens * (16 * shape.hidden + 4 * shape.intermediate) * width
    saved = (tokens * shape.layers * shape.hidden * width + block if cfg.gradient_checkpointing
             else shape.layers * block)
    logits = 3 * tokens * shape.vocab * 4
    z3 = cfg.zero_stage == 3
    parts = {f"base weights ({'÷ workers, ZeRO-3' if z3 else 'whole'})": weights,
             "adapter weights (fp32)": adapter * 4 // (world if z3 else 1),
             "adapter gradients (fp32)": adapter * 4 // (world if cfg.zero_stage >= 2 else 1),
             "optimizer state (Adam, fp32)": 2 * adapter * 4 // shard,
             "activations (micro-batch)": saved + logits,
             "runtime (+ DeepSpeed)": RUNTIME_BYTES + GIB // 4}
    if z3:  # workers/deepspeed_config.zero3_limits: two blocks live, one prefetched, and the all-gather's copy
        parts["gathered blocks (ZeRO-3)"] = 4 * shape.block_params * width
    return Process("train", f"training worker (ZeRO-{cfg.zero_stage})", world, parts)


def replica_bytes(spec: JobSpec) -> int:
    shape = Shape.from_config(spec.model.path)
    return calibrate_processes(spec, shape, "replica")[0].total


def choose_corda_strategy(spec: JobSpec) -> str:
    """The strategy the calibrate stage runs: the spec's, or for auto, layerwise when a replica does not fit."""
    corda = spec.init.corda_spec
    if corda.strategy != "auto":
        return corda.strategy
    if corda.actor_memory_gib is None:
        return "replica"
    return "replica" if replica_bytes(spec) <= corda.actor_memory_gib * GIB else "layerwise"


def plan(spec: JobSpec, worker_memory: int | None = None) -> dict:
    """Per stage and process: what it holds; the strategy auto picks; the workers needed to fit `worker_memory`."""
    shape = Shape.from_config(spec.model.path)
    width = DTYPE_BYTES[spec.model.dtype]
    stages = spec.effective_stages
    processes: list[Process] = []
    out: dict = {"model": {**asdict(shape), "params": shape.params, "weights_bytes": shape.params * width,
                           "dtype": spec.model.dtype}}
    if "calibrate" in stages:
        strategy = choose_corda_strategy(spec)
        out["corda"] = {"strategy": strategy, "strategy_asked": spec.init.corda_spec.strategy,
                        "covariance_bytes_per_group": {g: d * d * DTYPE_BYTES[spec.init.corda_spec.covariance_dtype]
                                                       for g, d in group_dims(spec, shape).items()},
                        "replica_bytes": replica_bytes(spec)}
        processes += calibrate_processes(spec, shape, strategy)
    if "train" in stages:
        processes.append(train_process(spec, shape))
    if "export" in stages:
        processes.append(export_process(spec, shape))
    out["driver"] = {"weights_bytes": 0, "note": "control plane only: references, small files, no model tensor"}
    out["processes"] = [{"stage": p.stage, "process": p.process, "count": p.count, "parts": p.parts,
                         "total_bytes": p.total} for p in processes]
    if worker_memory:
        out["fits"] = fits(spec, shape, worker_memory)
        # one process each, whatever the worker count: they fit or they do not
        out["fits"]["too_big"] = [f"{p.stage}: {p.process}" for p in processes
                                  if p.count == 1 and p.total > worker_memory]
    return out


def reservations(spec: JobSpec) -> dict[tuple[str, str], int]:
    """(stage, process kind) → the host memory each such process reserves from Ray's scheduler: its planned peak
    plus the plan's tolerance, so that Ray never puts more of them on a node than fit it. Processes on a GPU
    (`use_gpu`) reserve their GPU instead. Empty where the planner cannot read the model's config (not a
    Llama-family model): such a job runs unreserved."""
    try:
        processes = plan(spec)["processes"]
    except ValueError:
        return {}
    on_gpu = {("train", f"training worker (ZeRO-{spec.train.zero_stage})"): spec.train.use_gpu,
              **{("calibrate", f"covariance actor ({s})"): spec.init.corda_spec.use_gpu
                 for s in ("replica", "layerwise")}}
    return {(p["stage"], p["process"]): int(p["total_bytes"] * (1 + PLAN_TOLERANCE)) for p in processes
            if not on_gpu.get((p["stage"], p["process"]))}


def fits(spec: JobSpec, shape: Shape, memory: int) -> dict:
    """The fewest workers with which each stage's processes fit `memory` bytes each (None: no count fits)."""
    from jobspecs.load import parse_spec

    def needed(make) -> int | None:
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            if make(n).total <= memory:
                return n
        return None

    result = {}
    raw = spec.model_dump(mode="json", exclude_none=True)
    if "calibrate" in spec.effective_stages:
        def layerwise(n: int) -> Process:
            corda = {**raw["init"].get("corda", {}), "num_workers": n, "strategy": "layerwise"}
            other = parse_spec({**raw, "init": {**raw["init"], "corda": corda}}, check_files=False)
            return calibrate_processes(other, shape, "layerwise")[0]

        result["replica_fits"] = calibrate_processes(spec, shape, "replica")[0].total <= memory
        result["calibrate_layerwise_workers"] = needed(layerwise)
    if "train" in spec.effective_stages:
        def zero3(n: int) -> Process:
            train = {**raw["train"], "num_workers": n, "zero_stage": 3}
            return train_process(parse_spec({**raw, "train": train}, check_files=False), shape)

        result["train_zero3_workers"] = needed(zero3)
    return result
