"""The job spec: every knob of a peftfleet job, its default, its help text and its validation, in one place.

Cross-field validators word their errors as "<field path>: <reason>" with the path from the spec's root; the
loader reports that path as the error's location.

Relative paths are resolved against the spec file's folder (the loader passes it as validation context), so a
spec means the same thing from any working directory. Cross-field rules (what cannot run together) live in the
`JobSpec` validator at the bottom, each with the reason a user needs to fix it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobspecs.confinement import Outside, check_tree, entry, inside, open_checked
from jobspecs.deepspeed_keys import refusal, refused
from jobspecs.remote import (
    Location,
    S3Uri,
    covariance_problem,
    data_problem,
    is_remote,
    model_problem,
    read_json,
    tensor_names,
    top_files,
)
from jobspecs.section import Section
from jobspecs.sweep import SweepSpec

STAGE_ORDER = ("calibrate", "decompose", "train", "export")
"""Stages a spec may list, in the only order they can run. `upload` always runs last and is not listed."""

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")

# Keys a user might reach for to put secrets in the spec; named so the error says where credentials belong.
_CREDENTIAL_KEYS = {
    "access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "session_token", "credentials", "password", "token",
}


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    with readable(value):
        return path.resolve()


@contextlib.contextmanager
def readable(path: object) -> Iterator[None]:
    """Turn what the filesystem says of a path the spec names (a name too long, a folder that cannot be read) into
    the ValueError a validator raises, so validation says which field, never a 500."""
    try:
        yield
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None


def _existing(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    root = (info.context or {}).get("data_root")
    if root is not None and not path.is_relative_to(root):  # before existence: the answer says nothing of the host
        raise ValueError(f"{value} is outside the data root {root}")
    with readable(value):
        if (info.context or {}).get("check_files", True) and not path.exists():
            raise ValueError(f"no such file or directory: {path}")
    return path


ExistingPath = Annotated[Path, AfterValidator(_existing)]
"""A local path that must exist when the spec is validated (relative to the spec's folder)."""


def _input(value: object, info: ValidationInfo) -> Location:
    if isinstance(value, S3Uri):
        return value
    if is_remote(value):
        return S3Uri.parse(value)
    if not isinstance(value, str | Path):
        raise ValueError(f"a path or an s3://bucket/prefix URI, not {type(value).__name__}")
    return _existing(Path(value), info)


InputPath = Annotated[Path | S3Uri, PlainValidator(_input), PlainSerializer(str, when_used="json")]
"""An input: a local path that must exist (as ExistingPath), or `s3://bucket/prefix`, read with the AWS chain's
endpoint and credentials and fetched once per node (workers/storage/inputs.py); its objects are checked where the spec
is validated with files (the validators below)."""


def _prefix(value: object) -> S3Uri:
    if not is_remote(value):
        raise ValueError(f"an s3://bucket/prefix URI, not {value!r}")
    return S3Uri.parse(value)


Prefix = Annotated[S3Uri, PlainValidator(_prefix), PlainSerializer(str, when_used="json")]


def _checks_files(info: ValidationInfo) -> bool:
    return (info.context or {}).get("check_files", True)


def tokenizer_problem(folder: Location) -> str | None:
    """Why transformers cannot build a tokenizer from `folder` with the packages installed here (None: it can).
    A `tokenizers` file needs nothing else; a SentencePiece/tiktoken model needs its package to be converted."""
    files = top_files(folder)
    if "tokenizer.json" in files:
        return None
    if "tokenizer.model" in files:
        if importlib.util.find_spec("sentencepiece") or importlib.util.find_spec("tiktoken"):
            return None
        return ("holds only tokenizer.model, which transformers converts with the sentencepiece (or tiktoken) "
                "package, and neither is installed: install one, or add the tokenizer.json of a fast tokenizer")
    return "has no tokenizer (no tokenizer.json or tokenizer.model)"


def config_pad_id(model_folder: Location) -> int | None:
    """The pad id a model's config.json names (else its eos id), for pre-tokenized data without a tokenizer."""
    config = read_json(model_folder, "config.json")
    for key in ("pad_token_id", "eos_token_id"):
        value = config.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return None


class ModelSpec(Section):
    path: InputPath = Field(description="Folder of a Hugging Face causal LM (`save_pretrained` layout), or "
                            "s3://bucket/prefix holding one (safetensors weights; fetched once per node).")
    tokenizer: InputPath | None = Field(None, description="Tokenizer folder (or s3:// prefix); defaults to the model "
                                        "folder.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the frozen base weights are loaded in."
    )

    @field_validator("path")
    @classmethod
    def _is_model_folder(cls, path: Location, info: ValidationInfo) -> Location:
        if not _checks_files(info):
            return path
        if isinstance(path, S3Uri):
            if problem := model_problem(path):
                raise ValueError(problem)
        else:
            with readable(path):
                if not (path / "config.json").is_file():
                    raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path

    @property
    def tokenizer_path(self) -> Location:
        return self.tokenizer or self.path


def _source_shorthand(value: object) -> object:
    return {"path": value} if isinstance(value, str | Path) else value


class DataSource(Section):
    path: InputPath = Field(
        description="A .jsonl/.json/.parquet/.arrow file, a folder written by `datasets.Dataset.save_to_disk`, or a "
        "folder of data files of one type (read in name order); local, or s3://bucket/key of any of these."
    )
    limit: int | None = Field(None, gt=0, description="Use only the first `limit` records.")

    @field_validator("path")
    @classmethod
    def _known_format(cls, path: Location, info: ValidationInfo) -> Location:
        with readable(path):
            if _checks_files(info) and (problem := data_problem(path, DATA_SUFFIXES)):
                raise ValueError(problem)
        return path


Source = Annotated[DataSource, BeforeValidator(_source_shorthand)]


class DataFields(Section):
    """Column names read for each format, so existing datasets need no renaming."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    input_ids: str = "input_ids"


class DataSpec(Section):
    format: Literal["text", "instruction", "chat", "tokens"] = Field(
        "instruction",
        description="text: plain LM on `text`; instruction: `prompt`+`response`, only the response is learned; "
        "chat: `messages` rendered with the tokenizer's chat template, only assistant turns are learned; "
        "tokens: pre-tokenized `input_ids` (and optional `labels`).",
    )
    train: Source = Field(description="Training records.")
    eval: Source | None = Field(None, description="Held-out records for eval loss and best-checkpoint selection.")
    calibration: Source | None = Field(None, description="Records whose activations CorDA's covariance is built from.")
    max_seq_len: int = Field(512, gt=0, description="Sequences are truncated to this many tokens.")
    streaming: bool = Field(
        False, description="Stream data.train instead of tokenizing it whole in every worker: the source is cut "
        "into units (a folder's files; a parquet file's row groups), each epoch deals a seeded shuffle of them to "
        "the workers, and a worker reads one unit at a time (from a bucket: fetching only its own). Needs "
        "train.max_steps (a stream has no length to count epochs by) and at least one unit per worker."
    )
    fields: DataFields = Field(default_factory=DataFields)
    pad_token_id: int | None = Field(
        None, ge=0, description="Id given to padding positions (they are masked out, so any valid id works). "
        "Default: the tokenizer's pad token (else its eos); for format tokens without a tokenizer, config.json's "
        "pad_token_id (else eos_token_id).")


class AdaLoraSpec(Section):
    init_r: int = Field(12, gt=0, description="Rank every layer starts with; the budget shrinks it to `adapter.r`.")
    tinit: int = Field(0, ge=0, description="Warm-up optimizer steps before ranks are pruned.")
    tfinal: int = Field(0, ge=0, description="Final optimizer steps with the budget frozen.")
    delta_t: int = Field(1, gt=0, description="Steps between two budget reallocations.")
    beta1: float = Field(0.85, gt=0, lt=1)
    beta2: float = Field(0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser.")
    total_step: int | None = Field(
        None, gt=0, description="Optimizer steps of the whole run; derived from the train section when omitted."
    )


class IA3Spec(Section):
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="Target modules whose *input* (not output) is rescaled; must be a subset of target_modules.",
    )


_VIRTUAL_TOKENS = Field(16, gt=0, description="Learned virtual tokens prepended to every sequence (the prefix "
                        "tuning paper's range: 10-20).")


class PromptSpec(Section):
    num_virtual_tokens: int = _VIRTUAL_TOKENS
    init_text: str | None = Field(None, description="Initialise the tokens from the embeddings of this text.")


class PrefixSpec(Section):
    num_virtual_tokens: int = _VIRTUAL_TOKENS
    projection: bool = Field(
        False, description="Re-parameterise the prefix through a two-layer MLP (the paper's setup, key to stable "
        "training); the exported adapter holds the projected prefix, so it loads as a plain prefix.")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Width of the projection's hidden layer; default: the model's hidden size.")


class PTuningSpec(Section):
    num_virtual_tokens: int = _VIRTUAL_TOKENS
    encoder: Literal["mlp", "lstm"] = Field(
        "mlp", description="How peft's PromptEncoder re-parameterises the virtual tokens: an MLP, or a "
        "bidirectional LSTM followed by an MLP (the P-tuning paper's).")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Width of the encoder; default: the model's hidden size.")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (encoder lstm).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


VIRTUAL_TOKEN_METHODS = ("prefix", "prompt", "p_tuning")  # they add tokens, not a weight delta: nothing to merge


class AdapterSpec(Section):
    method: Literal["lora", "dora", "adalora", "ia3", "prefix", "prompt", "p_tuning", "bitfit"] = Field(
        "lora", description="lora, dora, adalora, ia3, prefix (prefix tuning), prompt (prompt tuning), p_tuning "
        "(peft's PromptEncoder) or bitfit (train the bias terms of target_modules only).")
    r: int = Field(8, gt=0, description="LoRA rank (AdaLoRA: the average rank the budget ends at).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: scaling = alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="Module names (suffixes) to adapt. BitFit: the "
        "modules whose biases are trained; all-linear: every bias of the model."
    )
    adalora: AdaLoraSpec | None = None
    ia3: IA3Spec | None = None
    prefix: PrefixSpec | None = None
    prompt: PromptSpec | None = None
    p_tuning: PTuningSpec | None = None

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module")
        return value

    @model_validator(mode="after")
    def _method_blocks(self) -> AdapterSpec:
        for block in ("adalora", "ia3", "prefix", "prompt", "p_tuning"):
            if getattr(self, block) is not None and block != self.method:
                raise ValueError(f"adapter.{block}: only valid when adapter.method is {block!r}")
        if self.method == "adalora" and self.adalora and self.adalora.init_r < self.r:
            raise ValueError(f"adapter.adalora.init_r: must be >= adapter.r ({self.adalora.init_r} < {self.r})")
        if self.method == "ia3" and self.ia3 and isinstance(self.target_modules, list):
            extra = set(self.ia3.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError(f"adapter.ia3.feedforward_modules: {sorted(extra)} are not in adapter.target_modules")
        return self

    def block(self) -> BaseModel | None:
        """The method-specific block, with its defaults when the spec omitted it."""
        defaults = {"adalora": AdaLoraSpec, "ia3": IA3Spec, "prefix": PrefixSpec, "prompt": PromptSpec,
                    "p_tuning": PTuningSpec}
        if self.method not in defaults:
            return None
        return getattr(self, self.method) or defaults[self.method]()


class CordaSpec(Section):
    mode: Literal["ipm", "kpm"] = Field(
        "ipm", description="ipm: adapt the top-r components (instruction-previewed); kpm: the bottom-r "
        "(knowledge-preserved), keeping what the calibration data exercises frozen."
    )
    samples: int = Field(256, gt=0, description="Calibration records used (the first `samples` of data.calibration).")
    seq_len: int = Field(2048, gt=0, description="Calibration records are truncated to this many tokens.")
    batch_size: int = Field(1, gt=0, description="Records per forward pass; padding never enters the statistics.")
    covariance_dtype: Literal["float32", "float64"] = Field(
        "float32", description="Accumulator precision; float32 is peft's, float64 halves nothing but rounding."
    )
    activation_scale: Literal["peft", "max_abs"] = Field(
        "peft", description="Per-sample scale: peft divides by abs(max(x)), the largest *signed* element; "
        "max_abs divides by max(|x|)."
    )
    damping: Literal["auto"] | float = Field(
        "auto", description="auto: peft's rule (0.01·mean(diag C), doubled until C' inverts well); a number: fixed."
    )
    strategy: Literal["auto", "replica", "layerwise"] = Field(
        "auto", description="replica: each actor holds the whole model and runs its shards through it; layerwise: "
        "the actors walk the decoder blocks in order, each holding one block and its own shards' hidden states "
        "(checkpointed to node_cache_dir after every block), so no process holds the model; the statistics are the "
        "same. auto: layerwise when a replica does not fit actor_memory_gib (replica when that is unset)."
    )
    num_workers: int = Field(1, gt=0, description="Covariance actors (replica: one model replica each).")
    use_gpu: bool = Field(False, description="One GPU per covariance actor.")
    actor_memory_gib: float | None = Field(
        None, gt=0, description="Memory Ray reserves for each covariance actor (GiB; a scheduling reservation, as "
        "Ray's `memory`), and what strategy auto checks a replica against (`peftfleet plan` shows the estimate)."
    )
    shard_samples: int = Field(
        16, gt=0, description="Samples per shard: the unit handed to an actor and redone after a failure. "
        "Shards are summed in shard order, so results do not depend on num_workers or on retries."
    )
    max_failures: int = Field(3, ge=0, description="Actor restarts (each retries its unfinished shards) allowed.")
    fidelity_samples: int = Field(4, ge=0, description="Held-out calibration records for the init-fidelity check.")
    fidelity_tolerance: float = Field(
        1e-3, gt=0, description="Max |logits(residual + CorDA adapter) − logits(base)| before the stage fails."
    )
    save_covariance: bool = Field(
        False, description="Also export the reduced statistics (artifact `covariance`, safetensors per input group)."
    )
    covariance_from: InputPath | None = Field(
        None, description="A `covariance` artifact folder (or its s3:// prefix) of an earlier job on the same model "
        "and calibration data: calibrate loads it instead of collecting, so another rank or mode costs only the "
        "decomposition."
    )

    @field_validator("covariance_from")
    @classmethod
    def _is_covariance(cls, path: Location | None, info: ValidationInfo) -> Location | None:
        if isinstance(path, S3Uri) and _checks_files(info) and (problem := covariance_problem(path)):
            raise ValueError(problem)
        return path


class InitSpec(Section):
    method: Literal["default", "corda"] = Field(
        "default", description="default: the adapter's own init; corda: context-oriented decomposition from data."
    )
    corda: CordaSpec | None = None

    @model_validator(mode="after")
    def _corda_block(self) -> InitSpec:
        if self.corda is not None and self.method != "corda":
            raise ValueError("init.corda: only valid when init.method is 'corda'")
        return self

    @property
    def corda_spec(self) -> CordaSpec:
        """The corda block, with its defaults when the spec omitted it."""
        return self.corda or CordaSpec()


class TrainSpec(Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU, or CPU processes).")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves for each worker (dataloading, CPU math).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes: PACK fills a node first (fast intra-node "
        "collectives); STRICT_SPREAD puts each worker on its own node.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_param: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    deepspeed_config: ExistingPath | None = Field(
        None, description="A DeepSpeed JSON used verbatim instead of the one generated from this section."
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    micro_batch_size: int = Field(4, gt=0, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(
        False, description="Keep only each decoder block's input for backward and recompute the rest: activation "
        "memory falls by roughly the number of layers, for about a third more compute."
    )
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(None, gt=0, description="Optimizer steps between evals (default: at the end).")
    checkpoint_every: int | None = Field(None, gt=0, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, gt=0, description="Best checkpoints (by eval loss) kept, plus the latest.")
    max_failures: int = Field(1, ge=0, description="Worker failures tolerated before the stage fails.")
    seed: int = 0
    log_every: int = Field(1, gt=0, description="Optimizer steps between two progress lines.")


ExportFormat = Literal["adapter", "adapter_on_original_base", "merged", "scaled_adapter", "adapter_bundle"]
Alpha = Annotated[float, Field(ge=0, le=2)]


class ExportSpec(Section):
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["adapter"],
        description="Artifact kinds: adapter (as trained); adapter_on_original_base (CorDA: a LoRA on the original "
        "model); merged (a full model W + α·ΔW per merge_alphas); scaled_adapter (a stock adapter with effect α·ΔW "
        "per merge_alphas); adapter_bundle (a sweep: several trials' adapters as named adapters on one base, "
        "sweep.bundle_trials). The report is always written.")
    wise_ft_alphas: list[Alpha] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        description="α values whose W_base + α·ΔW is evaluated on data.eval (the Wise-FT table and plot in the "
        "report); skipped without data.eval or for the virtual-token methods. [] skips the sweep.")
    merge_alphas: list[Alpha] = Field(default_factory=lambda: [1.0],
                                      description="α of each merged@α / adapter@α artifact.")
    conversion_tolerance: float = Field(
        1e-3, gt=0, description="Largest |Δlogits| allowed between residual base + trained adapter and original "
        "base + adapter_on_original_base; the stage fails above it.")


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageSpec(Section):
    uri: str = Field(
        "file://~/.peftfleet/store",
        description="file://PATH (relative paths are relative to the spec's folder) or s3://BUCKET[/PREFIX]. "
        "Credentials come from the environment / standard AWS chain, never from the spec.",
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, ...); AWS when unset.")
    public_endpoint_url: str | None = Field(
        None, description="The endpoint presigned download URLs name, when the one the cluster uses is not reachable "
        "by whoever downloads (an in-cluster http://minio:9000 behind a TLS ingress); default: endpoint_url.")
    region: str | None = None
    multipart_threshold_mb: int = Field(8, gt=0, description="Files larger than this upload in parts of this size.")
    max_attempts: int = Field(5, gt=0, description="Whole-operation attempts per file before the stage fails; "
                              "each request inside one is also retried by botocore up to this many times.")
    timeout_s: float = Field(
        60, gt=0, description="Seconds a request may wait for the server (connecting: at most 10) before it is retried."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in _CREDENTIAL_KEYS:
                    raise ValueError(
                        f"storage.{key}: credentials are never read from a spec; set AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY (or a profile / instance role) in the environment"
                    )
        return data

    @field_validator("public_endpoint_url")
    @classmethod
    def _public(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("https://", "http://")):
            raise ValueError(f"{url!r}: an http(s):// URL")
        return url

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str, info: ValidationInfo) -> str:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in ("file", "s3"):
            raise ValueError(f"must start with file:// or s3:// (got {uri!r})")
        if scheme == "s3":
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise ValueError(f"s3 uri needs a bucket: {uri!r}")
            if not _BUCKET.match(bucket):
                raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 chars: a-z 0-9 . -)")
            return uri.rstrip("/")
        if not rest:
            raise ValueError("file:// uri needs a path")
        return f"file://{_resolve(Path(rest), info)}"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http(s) URL like http://minio:9000 (got {url!r})")
        return url

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


class ClusterSpec(Section):
    address: str | None = Field(
        None, description="Ray address to join ('auto', ray://host:10001); unset starts an embedded local Ray."
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs an embedded Ray may use (default: all).")
    object_store_memory_mb: int = Field(512, gt=0, description="Object store size of an embedded Ray.")
    driver_cpus: float = Field(
        0, ge=0, description="CPUs reserved for the job's driver when it runs as a Ray job (`submit --address`, the "
        "gateway); Ray queues jobs whose driver does not fit. 0: the driver reserves nothing, like any Ray job."
    )
    node_cache_dir: Annotated[Path, AfterValidator(_resolve)] | None = Field(
        None, description="Folder on each node where stage outputs read from the store (residual_base, corda_init) "
        "are cached, fetched once per node and shared by its processes (and where layer-wise calibration spills); "
        "default: peftfleet-cache in the system temp folder. Put it on the node's local disk, not a shared "
        "filesystem, and never inside data_root: the job trusts what it finds there. A gateway sets its own."
    )
    node_cache_max_gib: float | None = Field(
        None, gt=0, description="Size limit of each node's cache (GiB): past it, the least recently used files are "
        "evicted after each download (never one being fetched). Unset: no limit. Inputs from a bucket (s3:// model, "
        "tokenizer, data) are cached there too, so size it for the model plus the stage outputs."
    )


_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


class JobSpec(Section):
    name: str = Field("job", description="Short job name; job ids are <name>-<timestamp>-<random>.")
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    sweep: SweepSpec | None = Field(None, description="Many trials of this spec (jobspecs/sweep.py): the best is "
                                    "exported as the job's adapter, each keeps its own under trials/<trial>/.")
    stages: list[Literal["calibrate", "decompose", "train", "export"]] | None = Field(
        None, description="Stages to run, in pipeline order; default: all that the spec implies. Upload always runs."
    )
    data_root: Annotated[Path, AfterValidator(_resolve)] | None = Field(
        None, description="Every file the job reads must lie under this folder: the paths the spec names, every "
        "file inside the folders it names (links resolved), every file an index names. The gateway sets its own "
        "and refuses specs that name one; unset (the CLI): links may lead anywhere."
    )
    input_prefixes: list[Prefix] | None = Field(
        None, description="Every s3:// input (and every object a node mirrors for it) must lie under one of these "
        "prefixes. The gateway sets its user's limits.input_prefixes and refuses specs that name any; unset (the "
        "CLI): any bucket the AWS chain's credentials can read."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):  # match() would let "x\n" through: `$` matches before a final newline
            raise ValueError("must be 1-40 chars of a-z, 0-9 and '-', starting with a letter or digit")
        return name

    @property
    def effective_stages(self) -> list[str]:
        if self.stages is not None:
            return list(self.stages)
        implied = ["train", "export"]
        return ["calibrate", "decompose", *implied] if self.uses_corda else implied

    @property
    def uses_corda(self) -> bool:
        """CorDA initialises the adapter (in a sweep: some trial's)."""
        return self.init.method == "corda" or bool(self.sweep and self.sweep.may_set("init.method", "corda"))

    @property
    def needs_tokenizer(self) -> bool:
        """Text is tokenized (every format but tokens), or prompt tuning starts from text."""
        prompt = self.adapter.prompt
        return self.data.format != "tokens" or bool(self.adapter.method == "prompt" and prompt and prompt.init_text)

    @model_validator(mode="after")
    def _confined_outputs(self) -> JobSpec:
        cache = self.cluster.node_cache_dir
        if cache is not None and self.data_root is not None and cache.is_relative_to(self.data_root):
            raise ValueError(f"cluster.node_cache_dir: {cache} is inside the data root {self.data_root}; the job "
                             "trusts what it finds in its cache, so it must be a folder no user writes")
        if self.input_prefixes is not None:
            for where, uri in input_paths(self, S3Uri):
                if not any(uri.is_relative_to(p) for p in self.input_prefixes):
                    raise ValueError(f"{where}: {uri} is not under a prefix you may read inputs from "
                                     f"(input_prefixes: {', '.join(self.input_prefixes) or 'none'})")
        return self

    @model_validator(mode="after")
    def _tokenizer(self, info: ValidationInfo) -> JobSpec:
        if not (info.context or {}).get("check_files", True):
            return self
        folder = self.model.tokenizer_path
        with readable(folder):
            problem = tokenizer_problem(folder)
            pad_id = config_pad_id(self.model.path) if problem and self.data.pad_token_id is None else 0
        if problem and self.needs_tokenizer:
            which = ("model.tokenizer" if self.model.tokenizer else
                     "model.tokenizer: not set, so the model folder is used, and it")
            why = ("adapter.prompt.init_text is tokenized" if self.data.format == "tokens" else
                   f"data.format {self.data.format!r} tokenizes text")
            raise ValueError(f"{which}: {folder} {problem}; {why}. Point model.tokenizer at a tokenizer folder "
                             "(save_pretrained of the model's tokenizer)")
        if problem and self.data.pad_token_id is None and pad_id is None:
            raise ValueError(f"data.pad_token_id: needed for format tokens, since {folder} has no tokenizer and "
                             f"{self.model.path / 'config.json'} names no pad_token_id or eos_token_id")
        return self

    @model_validator(mode="after")
    def _biases(self, info: ValidationInfo) -> JobSpec:
        if self.adapter.method != "bitfit" or not _checks_files(info):
            return self
        try:
            names = tensor_names(self.model.path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"adapter.method: bitfit trains the model's bias terms, and the tensors of "
                             f"{self.model.path} cannot be listed from its safetensors ({err})") from None
        if not bias_names(names, self.adapter.target_modules):
            which = ("has no bias terms at all" if not bias_names(names, "all-linear") else
                     f"has no bias in adapter.target_modules {self.adapter.target_modules}")
            raise ValueError(f"adapter.method: bitfit trains bias terms only, and {self.model.path} {which} "
                             "(Llama-family models have none: attention_bias and mlp_bias are off). Use a model "
                             "family with biases, e.g. Qwen2 (q/k/v projections), or another adapter method")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        stages = self.effective_stages
        if len(set(stages)) != len(stages):
            raise ValueError("stages: a stage is listed twice")
        if stages != sorted(stages, key=STAGE_ORDER.index):
            raise ValueError(f"stages: must follow pipeline order {list(STAGE_ORDER)}")
        if "export" in stages and "train" not in stages:
            raise ValueError("stages: export needs train (there is nothing to export without it)")
        if ("calibrate" in stages or "decompose" in stages) and not self.uses_corda:
            raise ValueError("stages: calibrate/decompose compute a CorDA init; set init.method: corda")
        if self.init.method == "corda":
            if self.data.calibration is None:
                raise ValueError("data.calibration: init.method corda needs calibration records")
            if self.adapter.method != "lora":
                raise ValueError(f"adapter.method: CorDA initialises LoRA's A and B; it cannot initialise "
                                 f"{self.adapter.method!r} (use lora)")
        if "decompose" in stages and "calibrate" not in stages:
            raise ValueError("stages: decompose needs calibrate (the covariance it decomposes)")
        if "calibrate" in stages and "decompose" not in stages:
            raise ValueError("stages: calibrate alone keeps nothing (its statistics live in memory until decompose "
                             "turns them into the CorDA init, or into the covariance artifact with "
                             "init.corda.save_covariance); add decompose")
        if self.init.method == "corda" and "train" in stages and "decompose" not in stages:
            raise ValueError("stages: training a CorDA-initialised adapter needs calibrate and decompose first")
        if self.train.offload_param and self.train.zero_stage != 3:
            raise ValueError("train.offload_param: parameter offload needs train.zero_stage: 3")
        if self.train.offload_optimizer and self.train.zero_stage == 0:
            raise ValueError("train.offload_optimizer: optimizer offload needs train.zero_stage >= 1")
        export = self.export
        if "adapter_bundle" in export.formats:
            if self.sweep is None:
                raise ValueError("export.formats: adapter_bundle collects a sweep's trials; this spec has no sweep")
            if self.adapter.method == "bitfit":
                raise ValueError("export.formats: adapter_bundle holds peft adapters; BitFit's trained biases are "
                                 "not one (export each trial's instead: they are under trials/<trial>/adapter)")
            for path, why in (("adapter.method", "one PeftModel holds adapters of one kind"),
                              ("model.path", "the bundle's adapters share one base")):
                if any(path in values for values in (self.sweep.grid, self.sweep.random, *self.sweep.trials)):
                    raise ValueError(f"export.formats: adapter_bundle needs one {path} for all trials ({why}); "
                                     f"this sweep varies it")
        if "adapter_on_original_base" in export.formats and not self.uses_corda:
            raise ValueError("export.formats: adapter_on_original_base converts an adapter trained on a residual "
                             "base (init.method: corda); this adapter already applies to the original base")
        if self.adapter.method in VIRTUAL_TOKEN_METHODS and {"merged", "scaled_adapter"} & set(export.formats):
            raise ValueError(f"export.formats: {self.adapter.method} tuning adds virtual tokens, not a weight "
                             "delta: there is no W + α·ΔW to merge or scale")
        if self.adapter.method == "bitfit" and "scaled_adapter" in export.formats:
            raise ValueError("export.formats: a BitFit adapter holds the trained biases themselves, not a delta to "
                             "scale; use merged, which interpolates W_base + α·Δbias")
        if self.adapter.method == "dora" and "scaled_adapter" in export.formats:
            raise ValueError("export.formats: a DoRA adapter cannot be scaled (its magnitude vector renormalises the "
                             "weights, so α·adapter ≠ α·ΔW); use merged, which interpolates the merged weights")
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError("train.max_steps: needed with data.streaming (a stream is not counted up front, so "
                             "epochs cannot say how many steps there are)")
        if self.data.streaming and self.data.train.limit is not None:
            raise ValueError("data.train.limit: not with data.streaming (there is no first N of a shuffled stream "
                             "of units); cut the source instead")
        if self.sweep and "train" not in stages:
            raise ValueError("stages: a sweep compares trained trials; it needs the train stage")
        if self.sweep and self.sweep.metric == "eval_loss" and self.data.eval is None:
            raise ValueError("sweep.metric: eval_loss needs data.eval (or rank the trials by their training loss)")
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16")
        return self



def bias_names(tensors: list[str], targets: list[str] | str) -> list[str]:
    """The bias tensors BitFit trains: those of the target modules (by name suffix), or all of them."""
    biases = [n for n in tensors if n.endswith(".bias")]
    if targets == "all-linear":
        return biases
    return [n for n in biases if n.removesuffix(".bias").rsplit(".", 1)[-1] in targets]


_OUTPUTS = {"data_root", "cluster.node_cache_dir", "input_prefixes"}  # not inputs: what confines them


def input_paths(spec: JobSpec, kind: type = Path) -> list[tuple[str, Path]]:
    """(field, path) of every local file or folder the job reads (`kind` S3Uri: every input in a bucket)."""
    found: list = []

    def walk(value: object, where: str) -> None:
        if where in _OUTPUTS:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}.{i}")
        elif isinstance(value, kind):
            found.append((where, value))

    walk(spec.model_dump(), "")
    return found


def input_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, why) for every file the job would read that leaves the data root or is no plain file, including
    the files inside the folders the spec names and the files their indexes name."""
    root = spec.data_root
    problems: list[tuple[str, str]] = []
    for where, path in input_paths(spec):
        try:
            inside(root, path, where)
            check_tree(root, path, where)
        except (Outside, OSError) as err:
            problems.append((where, str(err).removeprefix(f"{where}: ")))
    if spec.train.deepspeed_config is not None and not problems:
        problems += [("train.deepspeed_config", why) for why in deepspeed_problems(spec)]
    for where, index in [] if problems else _indexes(spec):
        try:
            index_entries(index, where)
        except Outside as err:
            problems.append((where, f"{index.name} {str(err).removeprefix(f'{where}: ')}"))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            problems.append((where, f"{index} is not a valid {index.name}"))
    return problems


# an index file → how to read the file names it holds
_INDEX_NAMES = {
    "model.safetensors.index.json": lambda data: data["weight_map"].values(),
    "groups.json": lambda data: [row["file"] for row in data],
    "state.json": lambda data: [f["filename"] for f in data["_data_files"]],  # datasets' save_to_disk
}


def _indexes(spec: JobSpec) -> list[tuple[str, Path]]:
    """(field, index file) of every local index the job's inputs have."""
    candidates = [("model.path", spec.model.path, "model.safetensors.index.json")]
    if spec.init.corda is not None and spec.init.corda.covariance_from is not None:
        candidates.append(("init.corda.covariance_from", spec.init.corda.covariance_from, "groups.json"))
    candidates += [(f"data.{k}.path", source.path, "state.json") for k in ("train", "eval", "calibration")
                   if (source := getattr(spec.data, k)) is not None]
    return [(where, Path(folder, name)) for where, folder, name in candidates
            if not isinstance(folder, S3Uri) and Path(folder, name).is_file()]


def index_entries(index: Path, what: str) -> list[Path]:
    """The files an index inside a folder names (a weight map, a covariance artifact's groups, a save_to_disk
    folder's state.json), each checked to be a file of that folder (`entry`). Raises Outside, or ValueError /
    KeyError / TypeError for an index that is not one."""
    data = json.loads(Path(index).read_text())
    return [entry(Path(index).parent, name, what) for name in _INDEX_NAMES[Path(index).name](data)]


def confined_deepspeed_config(spec: JobSpec) -> dict:
    """The spec's DeepSpeed JSON, read through a checked descriptor; for a job with a data_root, refused (naming
    the keys) unless every key is allow-listed. Raises ValueError."""
    path = spec.train.deepspeed_config
    with open_checked(spec.data_root, path, "train.deepspeed_config") as f:
        try:
            config = json.load(f)
        except ValueError as err:
            raise ValueError(f"train.deepspeed_config: {path} is not JSON: {err}") from None
    if spec.data_root is not None and (paths := refused(config)):
        raise ValueError(f"train.deepspeed_config: {path} {refusal(paths)}")
    return config


def deepspeed_problems(spec: JobSpec) -> list[str]:
    try:
        confined_deepspeed_config(spec)
    except (ValueError, OSError) as err:
        return [str(err).removeprefix("train.deepspeed_config: ")]
    return []
