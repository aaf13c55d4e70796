"""Layer-wise CorDA calibration (init.corda.strategy: layerwise) against the replica strategy, on real Ray."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from jobspecs.memory import choose_corda_strategy, layerwise_spills
from orchestrator.stages.context import Context
from orchestrator.stages.corda import run_calibrate, run_decompose
from tests.corda_helpers import corda_spec, ours, published, run_stages
from tests.helpers import ray_processes, wait_gone
from workers.corda.covariance import GroupStats
from workers.storage.store import LocalStore


def sums(ctx) -> list:
    """Each group's reduced Σxᵀx with its counts, as the `covariance` artifact saved them (save_covariance)."""
    from safetensors import safe_open

    out = []
    for group in ctx.calibration.groups:
        with safe_open(published(ctx) / "covariance" / f"{group.name}.safetensors", framework="pt") as f:
            meta = f.metadata()
            out.append(GroupStats(f.get_tensor("xtx"), int(meta["samples"]), int(meta["tokens"])))
    return out


def assert_same(a, b, exact: bool) -> None:
    """Exact within the layerwise strategy; against replica, within fp32 rounding (they run the same kernels in
    the same order here, so in practice they are equal too)."""
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6 * b[key].abs().max()), key


@pytest.fixture(scope="module")
def replica(local_ray, assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replica")
    return {batch: run_stages(corda_spec(assets, tmp / str(batch), batch_size=batch, shard_samples=6,
                                         save_covariance=True), tmp / str(batch))
            for batch in (1, 4)}


@pytest.mark.parametrize(("workers", "batch"), [(2, 4), pytest.param(1, 1, marks=pytest.mark.slow),
                                                pytest.param(3, 4, marks=pytest.mark.slow)])
def test_layerwise_equals_replica(assets, tmp_path, replica, workers, batch):
    spec = corda_spec(assets, tmp_path, batch_size=batch, shard_samples=6, num_workers=workers, strategy="layerwise",
                      save_covariance=True)
    ctx = Context(job_id="t", spec=spec, store=LocalStore(tmp_path / "store"), staging=tmp_path / "staging")
    run_calibrate(ctx)
    # each block was decomposed (and its sums saved) as soon as it was folded, while later blocks were collected
    groups = len(ctx.calibration.groups)
    assert len(ctx.calibration.early.decompositions) == len(ctx.calibration.early.saved) == groups
    assert ctx.calibration.totals == [None] * groups  # the object store let go of every sum
    run_decompose(ctx)
    assert [g.name for g in ctx.calibration.groups] == [g.name for g in replica[batch].calibration.groups]
    for got, ref in zip(sums(ctx), sums(replica[batch]), strict=True):
        assert (got.samples, got.tokens) == (ref.samples, ref.tokens)
        assert torch.allclose(got.xtx, ref.xtx, rtol=0, atol=1e-6 * ref.xtx.abs().max())
    assert_same(ours(ctx), ours(replica[batch]), exact=False)
    assert {s.block for s in ctx.calibration.shards} == {0, 1}  # the walk: one call per actor per block


@pytest.mark.slow
def test_layerwise_is_bit_identical_for_any_worker_count_and_kpm(local_ray, assets, tmp_path, caplog):
    """... and whether the actors keep their hidden states in memory or spill all but the shard at work to disk."""
    runs = [run_stages(corda_spec(assets, tmp_path / str(n), batch_size=4, shard_samples=6, num_workers=n,
                                  strategy="layerwise", mode="kpm"), tmp_path / str(n)) for n in (1, 2, 3)]
    spilling = corda_spec(assets, tmp_path / "spill", batch_size=4, shard_samples=6, num_workers=1,
                          strategy="layerwise", mode="kpm", actor_memory_gib=0.01)
    assert layerwise_spills(spilling) and not layerwise_spills(runs[0].spec)
    with caplog.at_level("INFO", logger="peftfleet"):
        runs.append(run_stages(spilling, tmp_path / "spill"))
    assert "each keeps only the shard at work in memory" in caplog.text
    for other in runs[1:]:
        assert_same(ours(other), ours(runs[0]), exact=True)


@pytest.mark.slow
def test_gqa_and_tied_embeddings(local_ray, assets, tmp_path):
    """One KV head for four query heads, and an LM head that is the embedding matrix."""
    base = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama")
    config = LlamaConfig(**{**base.config.to_dict(), "num_key_value_heads": 1, "tie_word_embeddings": True})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    model = {"path": str(tmp_path / "tied"), "tokenizer": str(assets / "tiny-llama")}
    runs = {s: run_stages(corda_spec(assets, tmp_path / s, model=model, batch_size=4, shard_samples=8,
                                     num_workers=2, strategy=s), tmp_path / s) for s in ("replica", "layerwise")}
    assert_same(ours(runs["layerwise"]), ours(runs["replica"]), exact=False)


@pytest.mark.slow
def test_killed_actor_mid_block_resumes_from_its_checkpoint(local_ray, assets, tmp_path):
    def spec_for(tmp):  # many shards per actor: an actor is inside `block` nearly all the time
        return corda_spec(assets, tmp, samples=64, num_workers=2, shard_samples=2, batch_size=2, max_failures=2,
                          strategy="layerwise")

    calm = run_stages(spec_for(tmp_path / "calm"), tmp_path / "calm")
    killed: list[int] = []

    def kill_one():
        # Kill inside the last block, once every shard's block-1 checkpoint exists: a block's retry may run after
        # the queued next block (Ray does not keep actor-task order across retries), so a kill in block 0 can
        # legitimately replay a block for the shard it interrupted.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            done = len(list(tmp_path.glob("cache/layerwise/*/actor-*/*.block-1.safetensors")))
            last = len(list(tmp_path.glob("cache/layerwise/*/actor-*/*.block-2.safetensors")))
            if done == 32 and last < 30:
                pids = [p.pid for p in ray_processes("ray::LayerwiseWorker.block")]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(0.005)

    holder: dict = {}
    spec = spec_for(tmp_path / "killed")
    spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"node_cache_dir": tmp_path / "cache"})})
    killer = threading.Thread(target=kill_one)
    killer.start()
    disturbed = run_stages(spec, tmp_path / "killed", holder)
    killer.join()
    assert killed, "no actor was caught inside a block"
    assert wait_gone(killed[0])
    assert_same(ours(disturbed), ours(calm), exact=True)
    # the restarted actor read its node's checkpoint: no block was recomputed from the embeddings
    assert sum(s.replayed for s in disturbed.calibration.shards) == 0
    assert not any(tmp_path.glob("cache/layerwise/*/actor-*/*.safetensors"))  # checkpoints are removed at the end


def test_auto_picks_layerwise_when_a_replica_does_not_fit(assets, tmp_path):
    assert choose_corda_strategy(corda_spec(assets, tmp_path)) == "replica"  # no memory given: as before
    assert choose_corda_strategy(corda_spec(assets, tmp_path, actor_memory_gib=8)) == "replica"
    # the runtime floor alone (~0.45 GiB) exceeds this: no replica fits
    assert choose_corda_strategy(corda_spec(assets, tmp_path, actor_memory_gib=0.2)) == "layerwise"
    assert choose_corda_strategy(corda_spec(assets, tmp_path, strategy="replica", actor_memory_gib=0.2)) == "replica"


class _Payload:
    """What an attacker plants: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_spill_file_is_never_unpickled_and_a_folder_made_first_is_refused(local_ray, assets, tmp_path):
    """The attack on the layer-wise spill files (a pickle written where an actor reads its hidden states back):
    the actor reads tensors only, and will not adopt a spill folder it did not make."""
    import pickle

    import ray

    from workers.corda.layerwise import LayerwiseWorker
    from workers.storage.node_cache import NodeCache

    cache = NodeCache(tmp_path / "cache")
    Actor = ray.remote(LayerwiseWorker).options(num_cpus=0, max_restarts=0)
    args = (str(assets / "tiny-llama"), "float32", "float32", "peft", "cpu", {0: [[1, 2, 3, 4]]}, 1, 0, cache)
    made_first = tmp_path / "cache" / "layerwise" / "job-1" / "actor-0"
    made_first.mkdir(parents=True)
    with pytest.raises(ray.exceptions.RayActorError, match="exists before its actor made it"):
        ray.get(Actor.remote(*args, "job-1/actor-0").where.remote())

    actor = Actor.remote(*args, "job-2/actor-0")
    groups = ray.get(actor.groups.remote(["q_proj", "v_proj"]))
    marker = tmp_path / "pwned"
    folder = tmp_path / "cache" / "layerwise" / "job-2" / "actor-0"
    for name in ("shard-0.block-0.safetensors", "shard-0.block-0.pt"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(actor.block.remote(0, groups[0]))
    assert "SafetensorError" in str(err.value) or "header" in str(err.value).lower(), err.value
    assert not marker.exists(), "the planted pickle ran"
    ray.kill(actor)
