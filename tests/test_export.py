"""The export stage: adapter on the original base (CorDA), Wise-FT sweep, merged@α / adapter@α, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
from peft import PeftModel
from peft.helpers import rescale_adapter_scale
from transformers import AutoModelForCausalLM

from jobspecs import parse_spec
from orchestrator.stages.context import Context
from orchestrator.stages.corda import run_calibrate, run_decompose
from orchestrator.stages.export import run_export
from orchestrator.stages.train import run_train
from tests.corda_helpers import ALPHA, TARGETS, R, published
from tests.helpers import tiny_spec
from workers.storage.store import LocalStore

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 17, 42, 99, 7, 23, 64, 5, 11, 80]])


def run_job(assets, tmp, stages, steps: int = 6, **sections) -> Context:
    """The job's stages in this process's Ray, as the driver runs them (upload aside)."""
    raw = tiny_spec(assets, f"file://{tmp / 'store'}", **sections)
    raw["train"] = {**raw["train"], "max_steps": steps, "eval_every": steps // 2, "micro_batch_size": 8}
    raw["data"]["calibration"] = str(assets / "calibration.jsonl")
    spec = parse_spec(raw)
    ctx = Context(job_id=f"t-{uuid.uuid4().hex[:6]}", spec=spec, store=LocalStore(tmp / "store"),
                  staging=tmp / "staging")
    for stage in stages:
        stage(ctx)
    return ctx


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base(assets):
    return AutoModelForCausalLM.from_pretrained(assets / "tiny-llama").eval()


@pytest.fixture(scope="module")
def lora_job(local_ray, assets, tmp_path_factory):
    return run_job(assets, tmp_path_factory.mktemp("lora"), [run_train, run_export],
                   export={"formats": ["adapter", "merged", "scaled_adapter"], "merge_alphas": [0.0, 0.5, 1.0]})


def test_merged_models_interpolate_from_the_base_to_the_trained_model(lora_job, assets):
    staging = published(lora_job)  # where the export task wrote the artifacts
    trained = PeftModel.from_pretrained(base(assets), staging / "adapter").eval()
    merged = {a: AutoModelForCausalLM.from_pretrained(staging / f"merged@{a}").eval() for a in ("0", "0.5", "1")}
    assert torch.allclose(logits(merged["0"]), logits(base(assets)), atol=1e-5)
    assert torch.allclose(logits(merged["1"]), logits(trained), atol=1e-4)
    assert not torch.allclose(logits(merged["0.5"]), logits(merged["1"]), atol=1e-3)
    # adapter@0.5 is what peft's own rescale_adapter_scale(0.5) does, and equals merged@0.5
    half = PeftModel.from_pretrained(base(assets), staging / "adapter@0.5").eval()
    with rescale_adapter_scale(trained, multiplier=0.5):
        assert torch.allclose(logits(half), logits(trained), atol=1e-5)
    assert torch.allclose(logits(half), logits(merged["0.5"]), atol=1e-4)


def test_wise_ft_sweep_ends_at_the_base_and_the_trained_model(lora_job):
    rows = {r["alpha"]: r for r in lora_job.export.wise_ft}
    assert sorted(rows) == [0.0, 0.25, 0.5, 0.75, 1.0]
    result = lora_job.train
    # α = 1 is the exported (best) checkpoint, evaluated the way training evaluated it
    assert rows[1.0]["eval_loss"] == pytest.approx(result.best_eval_loss, rel=1e-4)
    assert rows[0.0]["eval_loss"] > rows[1.0]["eval_loss"] + 0.1  # the base model is worse on this task
    # the eval curve starts where the base model is: LoRA's B is zero before the first step
    assert result.eval_loss_at_start == pytest.approx(rows[0.0]["eval_loss"], rel=1e-5)
    assert rows[1.0]["perplexity"] == pytest.approx(torch.tensor(rows[1.0]["eval_loss"]).exp().item(), rel=1e-6)


def test_report_renders_with_the_numbers_of_the_metrics(lora_job):
    folder = lora_job.staging / "report"  # the report is written by the driver
    report = json.loads((folder / "report.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert report["curves"]["loss"] == [m["loss"] for m in metrics]
    assert report["curves"]["eval"] == [[0, report["eval_loss_at_start"]],
                                        *[[m["step"], m["eval_loss"]] for m in metrics if "eval_loss" in m]]
    assert report["best_step"] == lora_job.train.best_step
    assert set(report["plots"]) == {"loss.png", "throughput.png", "wise_ft.png"}
    from PIL import Image

    for name in report["plots"]:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
        assert f'src="{name}"' in (folder / "index.html").read_text()


def load_in_fresh_process(tmp_path, staging, base_path, adapters: list[tuple[str, str]], models: list[str]) -> None:
    """Load artifacts with stock transformers/peft in a new interpreter that cannot import peftfleet."""
    code = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
staging, adapters, models = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ids = torch.tensor([[1, 17, 42, 99, 7]])
for base, kind in adapters:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), f"{staging}/{kind}")(input_ids=ids)
for kind in models:
    AutoModelForCausalLM.from_pretrained(f"{staging}/{kind}")(input_ids=ids)
    AutoTokenizer.from_pretrained(f"{staging}/{kind}")
assert not any(m.split(".")[0] in ("orchestrator", "workers", "jobspecs") for m in sys.modules)
print("loaded")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(staging), json.dumps(adapters), json.dumps(models)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]


def test_every_artifact_loads_with_stock_libraries_in_a_fresh_process(lora_job, assets, tmp_path):
    base_path = str(assets / "tiny-llama")
    load_in_fresh_process(tmp_path, published(lora_job), base_path,
                          [(base_path, "adapter"), (base_path, "adapter@0.5")], ["merged@0", "merged@0.5", "merged@1"])


def test_corda_adapter_on_the_original_base_reproduces_the_trained_model(local_ray, assets, tmp_path):
    """(The conversion does not depend on CorDA's mode: kpm's decomposition is tested in test_corda*.py.)"""
    job = run_job(assets, tmp_path, [run_calibrate, run_decompose, run_train, run_export], steps=2,
                  adapter={"r": R, "alpha": ALPHA, "target_modules": TARGETS},
                  init={"method": "corda", "corda": {"samples": 32, "fidelity_samples": 4}},
                  export={"formats": ["adapter", "adapter_on_original_base"], "wise_ft_alphas": [0.0, 1.0]})
    staging = published(job)
    residual = AutoModelForCausalLM.from_pretrained(staging / "residual_base")
    trained = PeftModel.from_pretrained(residual, staging / "adapter").eval()
    converted = PeftModel.from_pretrained(base(assets), staging / "adapter_on_original_base").eval()
    assert converted.peft_config["default"].r == 2 * R
    assert torch.allclose(logits(converted), logits(trained), atol=1e-4)
    conversion = job.export.conversion
    assert conversion["max_abs_logit_diff"] < 1e-4 and conversion["samples"] == 4
    load_in_fresh_process(tmp_path, staging, str(assets / "tiny-llama"),
                          [(str(assets / "tiny-llama"), "adapter_on_original_base"),
                           (str(staging / "residual_base"), "adapter")], ["residual_base"])
    # the sweep runs on the original base: α = 0 is the original model, not the residual one
    rows = {r["alpha"]: r["eval_loss"] for r in job.export.wise_ft}
    assert rows[1.0] == pytest.approx(job.train.best_eval_loss, rel=1e-4)


def random_adapter(assets, out, method: str):
    """A stock adapter of `method` on the tiny Llama with every tensor away from its init (a stand-in for
    training), and the model it makes."""
    from peft import get_peft_model

    from jobspecs.schema import AdapterSpec
    from workers.methods.adapters import peft_config

    extra = {"ia3": {"target_modules": ["k_proj", "down_proj"], "ia3": {"feedforward_modules": ["down_proj"]}},
             "adalora": {"r": 2, "adalora": {"init_r": 4}}}.get(method, {})
    spec = AdapterSpec.model_validate({"method": method, **extra})
    torch.manual_seed(0)
    model = get_peft_model(base(assets), peft_config(spec, total_steps=10, tokenizer_path=assets / "tiny-llama"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "ia3" in name else 0.3 * torch.randn_like(p))
    if method == "adalora":  # as after a budget reallocation: some ranks pruned, saved cut to the rank pattern
        pattern = {n.removeprefix("base_model.model."): [True, False, True, i % 2 == 0]
                   for i, (n, _) in enumerate(model.named_parameters()) if ".lora_E." in n}
        model.peft_config["default"].rank_pattern = pattern
    model.save_pretrained(out)
    return PeftModel.from_pretrained(base(assets), out).eval()


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "ia3"])
def test_streamed_merges_equal_peft_merge_and_unload(assets, tmp_path, method):
    """merged@α written shard by shard equals W_base + α·(peft's merge_and_unload − W_base), for every method with
    a weight delta; the walked Wise-FT loss equals the whole model's at both ends."""
    from workers.methods.merged_weights import MergedWeights, write_merged
    from workers.model.block_walk import eval_loss, merged
    from workers.model.loss import mean_token_loss

    base_path, adapter = assets / "tiny-llama", tmp_path / "adapter"
    trained = random_adapter(assets, adapter, method)
    assert (logits(trained) - logits(base(assets))).abs().max() > 1e-2
    if method == "dora":  # why α interpolates merged weights: a DoRA adapter scaled to 0 is not the base model
        with rescale_adapter_scale(trained, multiplier=0.0):
            assert (logits(trained) - logits(base(assets))).abs().max() > 1e-3
    examples = [{"input_ids": ids, "labels": ids} for ids in ([1, 5, 9, 12, 7, 3], [1, 4, 4, 8], [2, 9, 30])]
    for alpha, model in ((0.0, base(assets)), (1.0, trained)):
        walked = eval_loss(merged(base_path, adapter, alpha), examples, 2, 0, torch.float32)
        assert walked == pytest.approx(mean_token_loss(model, examples, 2, 0), rel=1e-5)
    whole, original = trained.merge_and_unload().state_dict(), base(assets).state_dict()
    for alpha in (0.0, 0.5, 1.0):
        out = tmp_path / f"merged@{alpha}"
        write_merged(base_path, MergedWeights(base_path, adapter, alpha), out, shard_bytes=200_000)
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
        streamed = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert streamed.keys() == whole.keys()
        # measured ≤ 1.5e-8: α·(W' − W) rounds apart from scaling the adapter by α
        for name, value in whole.items():
            assert torch.allclose(streamed[name], original[name] + alpha * (value - original[name]), atol=1e-6)


def test_a_walked_eval_in_chunks_equals_one_walk(assets, tmp_path, monkeypatch):
    """An eval set whose hidden states exceed the walk's budget is walked in chunks, with the same loss."""
    import workers.model.block_walk as block_walk

    random_adapter(assets, tmp_path / "adapter", "lora")
    examples = [{"input_ids": ids, "labels": ids} for ids in ([1, 5, 9, 12, 7, 3], [1, 4, 4, 8], [2, 9, 30])]
    model = block_walk.merged(assets / "tiny-llama", tmp_path / "adapter")
    whole = block_walk.eval_loss(model, examples, 1, 0, torch.float32)
    monkeypatch.setattr(block_walk, "WALK_HIDDEN_BYTES", 1)  # one batch a walk
    assert block_walk.eval_loss(model, examples, 1, 0, torch.float32) == pytest.approx(whole, rel=1e-6)


def test_a_model_that_cannot_be_walked_is_merged_and_evaluated_whole(tmp_path):
    """GPT-2 (Conv1D layers, fan_in_fan_out, biases, a tied head) is not a Llama-style stack: the Wise-FT loss
    falls back to the whole model, merged; the streamed merge needs no walk at all."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from workers.methods.merged_weights import MergedWeights, write_merged
    from workers.model.block_walk import eval_loss, merged
    from workers.model.loss import mean_token_loss

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "adapter")
    examples = [{"input_ids": ids, "labels": ids} for ids in ([1, 5, 9, 12, 7, 3], [1, 4, 4, 8])]
    trained = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "adapter")
    loss = eval_loss(merged(tmp_path / "gpt2", tmp_path / "adapter"), examples, 2, 0, torch.float32)
    assert loss == pytest.approx(mean_token_loss(trained.eval(), examples, 2, 0), rel=1e-5)
    write_merged(tmp_path / "gpt2", MergedWeights(tmp_path / "gpt2", tmp_path / "adapter"), tmp_path / "merged",
                 shard_bytes=2**30)
    streamed = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").state_dict()
    for name, value in trained.merge_and_unload().state_dict().items():
        assert torch.allclose(streamed[name], value, atol=1e-6), name


def test_bitfit_biases_merge_and_walk_like_the_model_with_them_loaded(assets, tmp_path):
    """BitFit's merged@α is the base with bias_base + α·Δbias (α 1: the trained biases exactly), streamed; the
    walked Wise-FT loss of a Qwen2 (a Llama-style stack with biases) equals the whole model's at both ends."""
    from safetensors.torch import save_file

    from workers.methods.bitfit import BITFIT_CONFIG, BITFIT_WEIGHTS
    from workers.methods.merged_weights import weights_merge, write_merged
    from workers.model.block_walk import eval_loss, merged
    from workers.model.loss import mean_token_loss

    base_path, adapter = assets / "tiny-qwen2", tmp_path / "adapter"
    original = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    torch.manual_seed(0)
    biases = {k: v + torch.randn_like(v) for k, v in original.items() if k.endswith(".bias")}
    adapter.mkdir()
    save_file(biases, str(adapter / BITFIT_WEIGHTS))
    (adapter / BITFIT_CONFIG).write_text('{"method": "bitfit"}')
    trained = AutoModelForCausalLM.from_pretrained(base_path)
    trained.load_state_dict(biases, strict=False)
    examples = [{"input_ids": ids, "labels": ids} for ids in ([1, 5, 9, 12, 7, 3], [1, 4, 4, 8], [2, 9, 30])]
    for alpha, model in ((0.0, AutoModelForCausalLM.from_pretrained(base_path)), (1.0, trained)):
        walked = eval_loss(merged(base_path, adapter, alpha), examples, 2, 0, torch.float32)
        assert walked == pytest.approx(mean_token_loss(model.eval(), examples, 2, 0), rel=1e-5)
    for alpha in (0.0, 0.5, 1.0):
        out = tmp_path / f"merged@{alpha}"
        write_merged(base_path, weights_merge(base_path, adapter, alpha), out, shard_bytes=200_000)
        streamed = AutoModelForCausalLM.from_pretrained(out).state_dict()
        for name, value in original.items():
            expected = value + alpha * (biases[name] - value) if name in biases else value
            assert torch.equal(streamed[name], biases[name]) if alpha == 1 and name in biases else \
                torch.allclose(streamed[name], expected, atol=1e-6), name
