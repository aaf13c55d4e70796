"""The training benchmarks' job: a small Llama, token data, the LoRA setup, and the two measurements the train and
remote benchmarks share (the plain peft + torch loop they compare with, and submit → first optimizer step)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.helpers import cli, write_spec

HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 512, 4, 1376, 2048
SAMPLES, SEQ, MICRO, STEPS, WARM = 96, 128, 4, 12, 2
R, TARGETS = 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plain_loop(model_path: str, data_path: str, threads: int) -> dict:
    """The peer: stock peft + torch AdamW, one process, token-mean loss; steady-state tokens/s and peak memory
    (measured as every job process measures its own)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.runtime.process_memory import bound_process_memory, peak_memory_mib

    bound_process_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    samples = [json.loads(line)["input_ids"] for line in Path(data_path).read_text().splitlines()]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens, seconds = 0, 0.0
    for step in range(STEPS):
        t0 = time.perf_counter()
        batch = samples[step * MICRO : (step + 1) * MICRO]
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step >= WARM:
            tokens, seconds = tokens + int(mask.sum()), seconds + time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds,
            "peak_memory_mib": peak_memory_mib()}


def spec_dict(model_path: Path | str, data_path: Path | str, store: Path, workers: int, steps: int) -> dict:
    return {
        "name": "bench-train",
        "model": {"path": str(model_path)},
        "data": {"format": "tokens", "train": str(data_path), "max_seq_len": SEQ},
        "adapter": {"r": R, "alpha": 2 * R, "target_modules": TARGETS},
        "train": {"num_workers": workers, "micro_batch_size": MICRO, "max_steps": steps, "zero_stage": 2,
                  "learning_rate": 1e-3},
        "storage": {"uri": f"file://{store}"},
        "cluster": {"num_cpus": 2},
    }


def submit_to_first_step(tmp: Path, model_path: Path | str, data_path: Path | str, env: dict | None = None,
                         **cluster) -> tuple[float, float]:
    """Seconds from running `peftfleet submit` (in `env`) until the train stage starts, and until step 1 is
    logged; `cluster`: more of the spec's cluster section."""
    tmp.mkdir(parents=True, exist_ok=True)
    raw = spec_dict(model_path, data_path, tmp / "store", 1, 3)
    raw["cluster"].update(cluster)
    spec = write_spec(tmp / "job.yaml", raw)
    state = tmp / "state"
    t0 = time.perf_counter()
    job_id = cli(state, "submit", spec, check=True, env=env).stdout.strip()
    log = state / "jobs" / job_id / "driver.log"
    stage_at = None
    while time.perf_counter() - t0 < 300:
        text = log.read_text() if log.exists() else ""
        if stage_at is None and "stage train: started" in text:
            stage_at = time.perf_counter() - t0
        if re.search(r"train: step 1/", text):
            first = time.perf_counter() - t0
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no first step within 300 s:\n{text}")
    while json.loads(cli(state, "status", job_id, "--json", check=True, env=env).stdout)["state"] in ("PENDING",
                                                                                                     "RUNNING"):
        time.sleep(0.5)
    return stage_at, first
