"""The train stage: Ray Train workers driving DeepSpeed ZeRO engines with peft adapters, on CPU with gloo."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import ray_processes, weights_only
from tests.train_helpers import adapter_tensors, assert_same_training, registered, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(local_ray, assets, tmp_path_factory):
    """One worker × micro-batch 8, and two workers × micro-batch 4 under ZeRO-2 and ZeRO-3 (with and without
    gradient checkpointing): one global batch."""
    tmp = tmp_path_factory.mktemp("train")
    return {
        "1w": train(assets, tmp / "a", num_workers=1, micro_batch_size=8, zero_stage=2),
        "2w-z2": train(assets, tmp / "b", num_workers=2, micro_batch_size=4, zero_stage=2),
        "2w-z3": train(assets, tmp / "c", num_workers=2, micro_batch_size=4, zero_stage=3),
        "2w-z3-ckpt": train(assets, tmp / "d", num_workers=2, micro_batch_size=4, zero_stage=3,
                            gradient_checkpointing=True),
    }


@pytest.mark.parametrize("run", ["2w-z2", "2w-z3"])
def test_two_workers_learn(runs, run):
    result = runs[run]
    evals = [m["eval_loss"] for m in result.metrics if "eval_loss" in m]
    assert len(result.metrics) == 6 and len(evals) == 2
    assert evals[-1] < evals[0] - 0.1, evals  # per-step training loss is too noisy (new examples every step)


def test_zero3_loads_partitioned_trains_as_zero2_and_saves_the_full_adapter(runs):
    """ZeRO-3 builds the base inside DeepSpeed's partitioned init (no rank holds it whole) and trains exactly as
    ZeRO-2's whole-model load; and, other tools' known failure, the saved adapter is not empty (shape [0])."""
    assert runs["2w-z3"].engine["partitioned_load"] and not runs["2w-z2"].engine["partitioned_load"]
    z3 = adapter_tensors(runs["2w-z3"])
    assert z3 and all(value.numel() > 0 for value in z3.values())
    assert_same_training(runs["2w-z3"], runs["2w-z2"])
    assert any(torch.count_nonzero(v) for k, v in z3.items() if "lora_B" in k)  # trained, not the zero init


def test_gradient_checkpointing_trains_identically(runs):
    """Recomputing each block in backward changes memory, not the arithmetic's result (beyond summation order)."""
    assert_same_training(runs["2w-z3-ckpt"], runs["2w-z3"])


def test_two_workers_equal_one_worker_with_the_same_global_batch(runs):
    assert_same_training(runs["2w-z2"], runs["1w"])


def test_bitfit_trains_the_same_biases_under_every_zero_stage(local_ray, assets, tmp_path):
    """BitFit (no peft adapter: the base's own biases trainable) under ZeRO 0 and 1 (one worker × 8) and ZeRO 2 and
    3 (two workers × 4, ZeRO-3 partitioned from the files): one global batch, the same training; the saved biases
    are the full tensors, every bias of the Qwen2, and they moved."""
    qwen2 = {"path": str(assets / "tiny-qwen2")}
    bitfit = {"method": "bitfit", "target_modules": "all-linear"}
    results = {stage: train(assets, tmp_path / f"z{stage}", adapter=bitfit, model=qwen2, zero_stage=stage,
                            num_workers=1 if stage < 2 else 2, micro_batch_size=8 if stage < 2 else 4)
               for stage in (0, 1, 2, 3)}
    assert results[3].engine["partitioned_load"] and results[3].engine["zero_stage"] == 3
    for stage in (0, 1, 2):
        assert_same_training(results[stage], results[3])
    saved, base = adapter_tensors(results[3]), AutoModelForCausalLM.from_pretrained(qwen2["path"]).state_dict()
    assert sorted(saved) == sorted(k for k in base if k.endswith(".bias")) and len(saved) == 6
    assert all(v.shape == base[k].shape and not torch.equal(v, base[k]) for k, v in saved.items())


def test_best_checkpoint_is_exported_not_the_last(local_ray, assets, tmp_path):
    # A learning rate that overshoots after the first eval: the best eval is early, the export must be that one.
    result = train(assets, tmp_path, max_steps=6, eval_every=2, learning_rate=0.5, warmup_steps=0)
    evals = {m["step"]: m["eval_loss"] for m in result.metrics if "eval_loss" in m}
    best_step = min(evals, key=evals.get)
    assert result.best_step == best_step and result.best_eval_loss == pytest.approx(evals[best_step])


@pytest.fixture(scope="module")
def adalora_runs(local_ray, assets, tmp_path_factory):
    """AdaLoRA with a budget that moves within a few steps, 2 workers, under ZeRO-2 and ZeRO-3."""
    adapter = {"method": "adalora", "r": 2, "target_modules": ["q_proj", "v_proj"],
               "adalora": {"init_r": 6, "tinit": 1, "tfinal": 2, "delta_t": 1}}
    tmp = tmp_path_factory.mktemp("adalora")
    return {stage: train(assets, tmp / f"z{stage}", adapter=adapter, max_steps=8, eval_every=4,
                         zero_stage=stage, num_workers=2, micro_batch_size=4) for stage in (2, 3)}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_adalora_ranks_shrink_to_the_budget(adalora_runs, zero_stage):
    result = adalora_runs[zero_stage]
    first, last = result.metrics[0]["ranks"], result.metrics[-1]["ranks"]
    assert set(first) == set(last) and len(first) == 4
    assert all(r == 6 for r in first.values())
    assert sum(last.values()) == 2 * len(last)  # the budget: target_r on average
    assert len({tuple(m["ranks"].values()) for m in result.metrics}) > 2  # ranks moved over time
    # the exported adapter is peft's resized one: each layer keeps exactly its final rank
    saved = adapter_tensors(result)
    for layer, rank in last.items():
        assert saved[f"base_model.model.model.{layer}.lora_E"].shape[0] == rank, layer


def test_adalora_under_zero3_trains_exactly_as_under_zero2(adalora_runs):
    """The regulariser, importance scores and masks see whole tensors under ZeRO-3 too."""
    z2, z3 = adalora_runs[2], adalora_runs[3]
    assert [m["ranks"] for m in z2.metrics] == [m["ranks"] for m in z3.metrics]
    assert_same_training(z3, z2)


def test_metrics_round_trip(runs):
    row = runs["1w"].metrics[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch", "tokens", "step_s"} <= set(row)
    peaks = runs["2w-z2"].peak_memory_mib
    assert len(peaks) == 2 and all(100 < p < 8192 for p in peaks), peaks  # MiB per worker process


def test_killed_worker_resumes_from_the_checkpoint(local_ray, assets, tmp_path):
    """The training set streamed (data.streaming: 8 files of 32 records, each rank reading 4 per epoch): a restarted
    worker group resumes each rank in the middle of its unit, from the positions in the checkpoint (the in-memory
    path keeps its positions the same way; tests/test_stream.py checks both round-trip exactly)."""
    lines = (assets / "train.jsonl").read_text().splitlines()
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(8):
        (parts / f"part-{k}.jsonl").write_text("\n".join(lines[k * 32 : (k + 1) * 32]) + "\n")
    settings = {"num_workers": 2, "micro_batch_size": 4, "zero_stage": 2, "max_failures": 1, "checkpoint_every": 1,
                "max_steps": 8, "eval_every": 4, "data_override": {"train": str(parts), "streaming": True}}
    calm = train(assets, tmp_path / "calm", **settings)
    earlier = {p.pid for p in ray_processes("ray::RayTrainWorker")}  # the calm run's workers may linger
    killed = []

    def kill_after_a_registered_checkpoint():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            # a checkpoint folder alone may not be registered yet
            snapshots = list((tmp_path / "killed" / "store").glob("jobs/*/train/checkpoint_manager_snapshot.json"))
            if snapshots and registered(snapshots[0]):
                pids = [p.pid for p in ray_processes("ray::RayTrainWorker") if p.pid not in earlier]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=kill_after_a_registered_checkpoint)
    thread.start()
    result = train(assets, tmp_path / "killed", **settings)
    thread.join()
    assert killed, "no worker was killed"
    assert len(result.resumed_from) == 1 and 1 <= result.resumed_from[0] < 8  # resumed, not restarted
    # the step count continued from the checkpoint: one row per step, no step twice, none missing
    assert [m["step"] for m in result.metrics] == list(range(1, 9))
    # and the run ended where the undisturbed one did: same optimizer state and data position after the resume
    assert_same_training(result, calm)


def test_instruction_format_learns_the_response_only(local_ray, assets, tmp_path):
    """One fixed prompt and one fixed response, both novel to the model and sharing no characters. Trained as
    `instruction` data the response becomes predictable and the prompt hardly moves (only through the general shift
    in token frequencies); trained as plain `text`, the same steps learn the prompt too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt, response = "QZXJWKQZXJWKQZXJWK\n", "mb tr lq mb tr lq"
    data = tmp_path / "fixed.jsonl"
    data.write_text("".join(json.dumps({"prompt": prompt, "response": response, "text": prompt + response}) + "\n"
                            for _ in range(16)))
    tokenizer = AutoTokenizer.from_pretrained(assets / "tiny-llama")
    n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # with BOS
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt + response, add_special_tokens=False)["input_ids"]]])

    def part_losses(model) -> tuple[float, float]:
        """Mean next-token loss over the prompt's tokens and over the response's tokens."""
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        token_loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        return float(token_loss[: n_prompt - 1].mean()), float(token_loss[n_prompt - 1 :].mean())

    def trained(fmt: str) -> tuple[float, float]:
        result = train(assets, tmp_path / fmt, max_steps=20, eval_every=None, num_workers=1, learning_rate=0.05,
                       micro_batch_size=4, warmup_steps=0, data_override={"format": fmt, "train": str(data),
                                                                           "eval": None})
        folder = tmp_path / fmt / "adapter"
        folder.mkdir()
        for name, content in result.adapter_files.items():
            (folder / name).write_bytes(content)
        base = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama")
        return part_losses(PeftModel.from_pretrained(base, folder))

    base_prompt, base_response = part_losses(AutoModelForCausalLM.from_pretrained(assets / "tiny-llama"))
    inst_prompt, inst_response = trained("instruction")
    text_prompt, _ = trained("text")
    learned_response, learned_prompt = base_response - inst_response, base_prompt - inst_prompt
    assert learned_response > 3 * max(learned_prompt, 0.1)  # the response is learned, the prompt hardly moves...
    assert base_prompt - text_prompt > 2 * max(learned_prompt, 0.1)  # ...though unmasked, the same steps learn it


def test_deepspeed_json_verbatim_with_bf16_and_optimizer_offload(local_ray, assets, tmp_path):
    """A user's own DeepSpeed JSON is used as given (here ZeRO-1, bf16, CPU optimizer offload, accumulation 2)."""
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 8,
          "gradient_clipping": 1.0, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
          "zero_force_ds_cpu_optimizer": False}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    result = train(assets, tmp_path, num_workers=1, deepspeed_config=str(tmp_path / "ds.json"))
    assert result.engine == {"zero_stage": 1, "world_size": 1, "micro_batch_size": 4, "grad_accum": 2, "bf16": True,
                             "fp16": False, "partitioned_load": False}
    evals = [m["eval_loss"] for m in result.metrics if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.1, evals


def test_adalora_rank_heatmap_renders(adalora_runs, tmp_path):
    from PIL import Image

    from orchestrator.stages.report import plot_ranks

    plot_ranks(adalora_runs[3].metrics, tmp_path / "ranks.png")
    with Image.open(tmp_path / "ranks.png") as image:
        image.verify()
        assert image.format == "PNG"


def test_pretokenized_data_trains_without_a_tokenizer(local_ray, assets, tmp_path):
    """data.format tokens on a model folder with no tokenizer files: padding comes from the model's config."""
    from transformers import AutoTokenizer

    from jobspecs.schema import DataSource, DataSpec
    from workers.data.examples import tokenize

    tokenizer = AutoTokenizer.from_pretrained(assets / "tiny-llama")
    files, data = {}, DataSpec(train=assets / "train.jsonl")
    for split in ("train", "eval"):
        examples = tokenize(DataSource(path=assets / f"{split}.jsonl"), tokenizer, data)
        files[split] = tmp_path / f"{split}-tokens.jsonl"
        files[split].write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    bare = weights_only(assets, tmp_path / "bare")
    result = train(assets, tmp_path, model={"path": str(bare)},
                   data_override={"format": "tokens", "train": str(files["train"]), "eval": str(files["eval"])})
    evals = [m["eval_loss"] for m in result.metrics if "eval_loss" in m]
    assert evals[-1] < result.eval_loss_at_start - 0.1, (result.eval_loss_at_start, evals)


_GRAPH_PROBE = r"""
import gc, json, os, sys
from types import SimpleNamespace
import torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
import deepspeed
from peft import LoraConfig, get_peft_model
from transformers.integrations import HfDeepSpeedConfig
from workers.train.partitioned_load import partitioned_model
from workers.train.train_loop import micro_step, skip_cpu_shm_build
from workers.model.loss import token_loss_sum

skip_cpu_shm_build()
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep = HfDeepSpeedConfig(config)
deepspeed.init_distributed(dist_backend="gloo")
model = get_peft_model(partitioned_model(sys.argv[1], torch.float32), LoraConfig(r=4, target_modules=["q_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
ids = torch.randint(0, 300, (2, 16))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

def graph_nodes():  # Python autograd nodes still alive (DeepSpeed's hooks are such): each forward makes a fresh set
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.autograd.function.BackwardCFunction))

ours = []
for _ in range(4):
    micro_step(SimpleNamespace(engine=engine, budget=None), batch, 1.0, allocate=False, step=0)
    ours.append(graph_nodes())
kept = []
for _ in range(4):  # the control: the same steps, the loss kept until it is rebound
    loss = token_loss_sum(engine, batch)[0]
    engine.backward(loss)
    engine.step()
    kept.append(graph_nodes())
print(json.dumps({"ours": ours, "kept": kept}))
"""


def test_a_micro_step_leaves_no_graph_behind(assets):
    """A loss that outlives its micro-step keeps the step's whole autograd graph (DeepSpeed's ZeRO-3 nodes and what
    they hold) resident through the next forward and backward: +0.27× the model per worker, measured. The train
    loop's micro-step leaves no graph behind."""
    import subprocess
    import sys

    from tests.helpers import free_port

    out = subprocess.run([sys.executable, "-c", _GRAPH_PROBE, str(assets / "tiny-llama"), str(free_port())],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["ours"] == [0, 0, 0, 0], counts
    assert min(counts["kept"]) > 0, counts  # the probe sees a graph that is still referenced
