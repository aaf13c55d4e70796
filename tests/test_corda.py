"""CorDA at cluster scale vs peft's single-process `preprocess_corda`, on a real Ray runtime."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from transformers import AutoModelForCausalLM

from orchestrator.stages.context import Context
from orchestrator.stages.corda import calibration_samples, run_calibrate
from tests.corda_helpers import ALPHA, TARGETS, R, corda_spec, ours, published, run_stages
from tests.helpers import ray_processes, wait_gone
from workers.corda.covariance import GroupStats
from workers.corda.decompose import decompose_group
from workers.storage.store import LocalStore


@pytest.fixture(scope="module")
def peft_reference(assets, tmp_path_factory):
    """peft's own CorDA on the same samples (batch 1), for both modes, plus peft's covariance per module."""
    tmp = tmp_path_factory.mktemp("peft")
    spec = corda_spec(assets, tmp)
    samples, _, _ = calibration_samples(spec)
    refs = {}
    for mode in ("ipm", "kpm"):
        base = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama")
        cov_file = tmp / f"cov-{mode}.pt"
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method=mode, covariance_file=str(cov_file)))
        with torch.no_grad():
            preprocess_corda(base, config, run_model=lambda b=base: [b(input_ids=torch.tensor([s])) for s in samples])
        model = get_peft_model(base, config)
        refs[mode] = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()}
        refs["covariance"] = torch.load(cov_file)
    return refs


def assert_matches_peft(got: dict, ref: dict, mode: str) -> None:
    scaling = ALPHA / R
    layers = sorted({k.rsplit(".", 3)[0] for k in got if ".lora_A." in k})
    assert len(layers) == 2 * len(TARGETS)
    for layer in layers:
        a, b = got[f"{layer}.lora_A.default.weight"], got[f"{layer}.lora_B.default.weight"]
        ra, rb = ref[f"{layer}.lora_A.default.weight"], ref[f"{layer}.lora_B.default.weight"]
        w_res, ref_res = got[f"{layer}.base_layer.weight"], ref[f"{layer}.base_layer.weight"]
        norm_w = torch.linalg.norm(ref_res + scaling * rb @ ra)
        # ΔW = scaling·B·A and the residual are what the model computes with. They differ from peft's only by
        # fp32 rounding of a differently-ordered covariance sum (~1e-7 relative, see the covariance test)
        # amplified by C'⁻¹, whose condition numbers reach ~5e3 here; given peft's own covariance the
        # decomposition is identical to 1e-6 (test_decomposition_of_peft_covariance_is_peft_exactly).
        assert torch.linalg.norm(scaling * (b @ a - rb @ ra)) / norm_w < 5e-4, layer
        assert (w_res - ref_res).abs().max() < 5e-4, layer
        if mode == "kpm":
            # KPM keeps the *smallest* singular values, which sit close together: under a 1e-7 perturbation the
            # factors may rotate inside the kept subspace, leaving ΔW (checked above) unchanged.
            continue
        # A and B themselves, up to the sign of each singular component (SVD's own freedom).
        sign = torch.sign((a * ra).sum(dim=1))
        assert torch.allclose(a * sign[:, None], ra, rtol=0, atol=5e-3 * ra.abs().max()), layer
        assert torch.allclose(b * sign[None, :], rb, rtol=0, atol=5e-3 * rb.abs().max()), layer


def test_covariance_equals_peft_and_groups_share_one_matrix(local_ray, assets, tmp_path, peft_reference):
    ctx = Context(job_id="t", spec=corda_spec(assets, tmp_path, batch_size=4), store=LocalStore(tmp_path),
                  staging=tmp_path / "staging")
    run_calibrate(ctx)
    groups, totals = ctx.calibration.groups, ctx.calibration.totals
    # q/k/v read one tensor, gate/up another: 4 groups per layer where peft keeps 7 matrices
    assert [len(g.modules) for g in groups] == [3, 1, 2, 1] * 2
    for g, total in zip(groups, totals, strict=True):
        stats = ray.get(total)
        assert stats.samples == 32
        ours_cov = stats.xtx / stats.samples
        for module in g.modules:
            ref = peft_reference["covariance"][module]
            assert torch.allclose(ours_cov, ref, rtol=0, atol=1e-5 * ref.abs().max()), module


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_decomposition_of_peft_covariance_is_peft_exactly(assets, peft_reference, mode):
    base = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama").state_dict()
    ref = peft_reference[mode]
    for layer, cov in peft_reference["covariance"].items():
        result = decompose_group(GroupStats(cov.clone(), 1, 1), layer, (layer,), {layer: base[f"{layer}.weight"]},
                                 R, mode, ALPHA / R)
        got = result.layers[0]
        sign = torch.sign((got.lora_A * ref[f"{layer}.lora_A.default.weight"]).sum(dim=1))
        assert torch.allclose(got.lora_A * sign[:, None], ref[f"{layer}.lora_A.default.weight"], atol=1e-6)
        assert torch.allclose(got.lora_B * sign[None, :], ref[f"{layer}.lora_B.default.weight"], atol=1e-6)
        assert torch.allclose(got.residual, ref[f"{layer}.base_layer.weight"], atol=1e-6)


@pytest.mark.parametrize(("workers", "batch"), [(1, 1), pytest.param(2, 4, marks=pytest.mark.slow),
                                                pytest.param(3, 4, marks=pytest.mark.slow)])
def test_matches_peft_any_workers_any_batch(local_ray, assets, tmp_path, peft_reference, workers, batch):
    for mode in ("ipm", "kpm"):
        spec = corda_spec(assets, tmp_path / mode, num_workers=workers, batch_size=batch, shard_samples=6, mode=mode)
        ctx = run_stages(spec, tmp_path / mode)
        assert_matches_peft(ours(ctx), peft_reference[mode], mode)
        report = json.loads((ctx.staging / "report" / "corda.json").read_text())
        assert report["init_fidelity_max_abs_logit_diff"] < 1e-4
        assert all(layer["reconstruction_error"] < 1e-6 for g in report["groups"] for layer in g["layers"])


def test_outputs_load_with_stock_peft_and_reproduce_base_logits(local_ray, assets, tmp_path):
    ctx = run_stages(corda_spec(assets, tmp_path, batch_size=4), tmp_path)
    base = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama")
    init = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(published(ctx) / "residual_base"),
                                     published(ctx) / "corda_init")
    assert json.loads((published(ctx) / "corda_init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        assert (init(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() < 1e-4
    assert (ctx.staging / "report" / "corda_spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_deficient_calibration_warns(local_ray, assets, tmp_path):
    ctx = run_stages(corda_spec(assets, tmp_path, samples=3, fidelity_samples=1), tmp_path)
    assert any("rank-deficient" in w and "too few or too short" in w for w in ctx.warnings), ctx.warnings
    report = json.loads((ctx.staging / "report" / "corda.json").read_text())
    assert report["warnings"] == ctx.warnings
    assert min(g["numerical_rank"] for g in report["groups"]) < 64


def test_nan_activations_fail_with_the_layer_name(local_ray, assets, tmp_path):
    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    spec = corda_spec(assets, tmp_path, model={"path": str(broken), "tokenizer": str(assets / "tiny-llama")})
    ctx = Context(job_id="t", spec=spec, store=LocalStore(tmp_path), staging=tmp_path / "staging")
    with pytest.raises(Exception, match=r"NaN/Inf in the input activations of model\.layers\.1\.mlp\.gate_proj"):
        run_calibrate(ctx)


@pytest.mark.slow
def test_killed_actor_mid_shard_gives_the_same_numbers(local_ray, assets, tmp_path):
    def spec_for(tmp):  # many small shards: an actor is inside `collect` nearly all the time
        return corda_spec(assets, tmp, samples=64, num_workers=2, shard_samples=2, batch_size=2, max_failures=2)

    calm = run_stages(spec_for(tmp_path / "calm"), tmp_path / "calm")
    killed: list[int] = []

    def kill_one():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = [p.pid for p in ray_processes("ray::CovarianceWorker.collect")]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one)
    killer.start()
    disturbed = run_stages(spec_for(tmp_path / "killed"), tmp_path / "killed")
    killer.join()
    assert killed, "no actor was caught inside a shard"
    assert killed[0] in {pid for pid, _ in disturbed.calibration.actors}  # a covariance actor, mid-shard
    assert wait_gone(killed[0])
    a, b = ours(calm), ours(disturbed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical: shards are summed in shard order


@pytest.mark.slow
def test_saved_covariance_lets_another_mode_skip_collection(local_ray, assets, tmp_path):
    first = run_stages(corda_spec(assets, tmp_path / "a", batch_size=4, save_covariance=True), tmp_path / "a")
    saved = published(first) / "covariance"
    assert (saved / "groups.json").is_file()
    # same mode from the saved statistics: bit-identical to collecting them, whatever the number of reducers
    # (asked for 50, which reserve no CPU: as many as the cluster has CPUs start)
    again = run_stages(corda_spec(assets, tmp_path / "b", covariance_from=str(saved), num_workers=50), tmp_path / "b")
    assert again.calibration.shards == []  # nothing was collected
    assert len(again.calibration.reducers) == int(ray.cluster_resources()["CPU"])
    a, b = ours(first), ours(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another mode and rank from the same statistics
    other = run_stages(corda_spec(assets, tmp_path / "c", covariance_from=str(saved), mode="kpm"), tmp_path / "c")
    report = json.loads((other.staging / "report" / "corda.json").read_text())
    assert report["mode"] == "kpm" and report["init_fidelity_max_abs_logit_diff"] < 1e-4
