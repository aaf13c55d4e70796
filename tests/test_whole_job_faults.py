"""A whole job on a simulated three-node Ray cluster, submitted through the CLI, loses one node during calibrate
and another during train — and succeeds with exactly the CorDA init of an undisturbed run, training resumed from
its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import pytest
import ray
import torch
from ray.util.state import list_actors, list_tasks

from jobspecs import parse_spec
from orchestrator.control.launchers import process_running
from tests.corda_helpers import corda_job, corda_tensors, ours, run_stages
from tests.helpers import cli, cmdline, ray_processes, wait_gone, write_spec
from tests.train_helpers import registered

pytestmark = pytest.mark.slow

MAX_STEPS = 6
# Many one-sample shards: a covariance actor caught inside one still has shards to do after its node is gone.
CORDA = {"samples": 64, "num_workers": 2, "shard_samples": 1, "batch_size": 1, "max_failures": 3}
TRAIN = {"num_workers": 1, "max_failures": 2, "max_steps": MAX_STEPS, "checkpoint_every": 2, "eval_every": None,
         "log_every": 1}
STATES = ["PENDING", "calibrate", "decompose", "train", "export", "upload", "SUCCEEDED", "FAILED", "CANCELLED"]
LATER = {stage: set(STATES[STATES.index(stage) + 1 :]) for stage in STATES}
TIMINGS = ("calibrate_s", "decompose_s")  # wall times: the only numbers that may differ between two runs


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    # The head only coordinates (the job's driver and Ray Train's controller attach to it, and neither may go);
    # three one-CPU worker nodes: the two covariance actors SPREAD over two of them, the spare takes the one
    # that loses its node; training's one worker lands on a surviving node, and after losing it on the last.
    # A lost node is declared dead after 4 missed health checks half a second apart (Ray's default: 5 × 3 s), and
    # its processes notice within 50 ms that their raylet is gone (default: up to 1 s, in which a "lost" covariance
    # actor can finish all its shards of ~20 ms each): closer to a machine that is really gone.
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
              "raylet_death_check_interval_milliseconds": 50}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@dataclass
class Removal:
    stage: str  # the job's stage, read from its record just before the removal and again just after
    stage_after: str
    actor: str  # the class of the actor whose node was removed
    pid: int
    node_id: str
    reducers: int = 0  # reducers that went with the node
    at: float = 0.0  # time.time() when the node was removed


class NodeRemover(threading.Thread):
    """Watches the job through its record in the store and the cluster's processes. Removes the node of a covariance
    actor while the actor is inside its first shard (an actor beside a reducer, if there is one), then the node of
    the training worker once a checkpoint is registered.

    Ray titles an actor's process by its class and the method it runs, and starts it as a child of its node's
    raylet: /proc tells which actor is where, and when it is inside a shard, within milliseconds. (The state API
    answers in tenths of a second, by when most of the ~20 ms shards are done.) Ray Train writes its checkpoint
    snapshot once it has registered a checkpoint; there the state API is quick enough to find the worker."""

    def __init__(self, cluster, store: Path, timeout: float = 300):
        super().__init__(daemon=True)
        self.cluster, self.store, self.deadline = cluster, store, time.monotonic() + timeout
        self.removals: list[Removal] = []
        self.error: BaseException | None = None
        self.job_id: str | None = None

    def run(self) -> None:
        try:
            self.job_id = self._wait_for(self._job_id)
            workers, reducers = self._wait_for(self._calibrate_actors, poll=0.05)
            reducer_nodes = [node for _, node in reducers]
            watched = [w for w in workers if w[1] in reducer_nodes] or workers
            caught = self._wait_for(lambda: self._inside_a_shard(watched), poll=0.002)
            self._remove("CovarianceWorker", *caught, reducers=reducer_nodes.count(caught[1]))

            (worker,) = self._wait_for(self._training_worker)
            snapshot = self.store / "jobs" / self.job_id / "train" / "checkpoint_manager_snapshot.json"
            self._wait_for(lambda: (self._still("train") and registered(snapshot)) or None, poll=0.02)
            self._remove("RayTrainWorker", *worker)
        except BaseException as err:  # handed to the test
            self.error = err

    def _wait_for(self, probe, poll: float = 0.1):
        while time.monotonic() < self.deadline:
            if (found := probe()) is not None:
                return found
            time.sleep(poll)
        raise TimeoutError(f"not seen in time: {probe}")

    def _job_id(self) -> str | None:
        jobs = list((self.store / "jobs").glob("*/job.json"))
        return jobs[0].parent.name if jobs else None

    def stage(self) -> str | None:
        """The running stage from the job's record, else the job's state (PENDING, SUCCEEDED...); None mid-write."""
        try:
            record = json.loads((self.store / "jobs" / self.job_id / "job.json").read_text())
        except (OSError, ValueError):
            return None
        return record["stage"] if record["state"] == "RUNNING" else record["state"]

    def _still(self, stage: str) -> bool:
        """Whether the job is in `stage`; fails fast (not at the deadline) once it has gone past it."""
        now = self.stage()
        if now in LATER[stage]:
            raise AssertionError(f"stage {stage} ended before its node could be removed (now {now})")
        return now == stage

    def _calibrate_actors(self):
        """(covariance actors, reducers) as (pid, node id), once all of them have started."""
        if not self._still("calibrate"):
            return None
        workers, reducers = _node_processes(self.cluster, b"ray::CovarianceWorker", b"ray::Reducer")
        n = CORDA["num_workers"]
        return (workers, reducers) if len(workers) == n and len(reducers) == n else None

    _polls = 0

    def _inside_a_shard(self, actors: list[tuple[int, str]]) -> tuple[int, str] | None:
        self._polls += 1
        if self._polls % 50 == 0:
            self._still("calibrate")
        return next((a for a in actors if cmdline(a[0]).startswith(b"ray::CovarianceWorker.collect")), None)

    def _training_worker(self) -> list[tuple[int, str]] | None:
        if not self._still("train"):
            return None
        actors = list_actors(address=self.cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                     ("state", "=", "ALIVE")])
        found = [(a.pid, a.node_id) for a in actors if cmdline(a.pid).startswith(b"ray::RayTrainWorker")]
        return found if len(found) == TRAIN["num_workers"] else None

    def _remove(self, actor: str, pid: int, node_id: str, reducers: int = 0) -> None:
        node = next(n for n in self.cluster.list_all_nodes() if n.node_id == node_id)
        before, at = self.stage(), time.time()
        self.cluster.remove_node(node, allow_graceful=False)
        self.removals.append(Removal(before, self.stage(), actor, pid, node_id, reducers, at))


def _node_processes(cluster, *titles: bytes) -> list[list[tuple[int, str]]]:
    """Per title, (pid, node id) of the cluster's processes whose Ray title starts with it."""
    raylets = {node.all_processes["raylet"][0].process.pid: node.node_id for node in cluster.list_all_nodes()}
    return [[(p.pid, raylets[p.parent]) for p in ray_processes(title.decode()) if p.parent in raylets]
            for title in titles]


def _numbers(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMINGS}


def test_job_survives_losing_a_node_in_calibrate_and_one_in_train(cluster, assets, tmp_path, state_dir):
    # The undisturbed reference: calibrate + decompose of the same spec, in this process, on the whole cluster.
    calm_dir = tmp_path / "calm"
    calm = run_stages(parse_spec(corda_job(assets, calm_dir, **CORDA)), calm_dir)
    calm_job = ray.get_runtime_context().get_job_id()

    job = tmp_path / "job"
    spec = corda_job(assets, job, **CORDA)
    spec.update(stages=["calibrate", "decompose", "train", "export"], cluster={"address": cluster.address})
    spec["train"].update(TRAIN)
    spec["export"] = {"wise_ft_alphas": []}
    remover = NodeRemover(cluster, job / "store")
    remover.start()
    try:
        run = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", spec), "--wait", timeout=400)
    finally:
        _stop_driver(state_dir)
    remover.join(timeout=10)
    assert remover.error is None, repr(remover.error)
    assert run.returncode == 0, run.stderr[-5000:]
    job_id = run.stdout.strip()
    assert f"job {job_id} SUCCEEDED" in run.stderr

    # Both nodes went mid-stage, each taking its actor's process with it.
    calibrate, train = remover.removals
    assert (calibrate.actor, calibrate.stage, calibrate.stage_after) == ("CovarianceWorker", "calibrate", "calibrate")
    assert (train.actor, train.stage, train.stage_after) == ("RayTrainWorker", "train", "train"), remover.removals
    assert wait_gone(calibrate.pid) and wait_gone(train.pid)
    # The covariance actor came back on another node, and its shards not done by then were done there.
    (restarted,) = [a for a in list_actors(address=cluster.address, detail=True, filters=[
        ("class_name", "=", "CovarianceWorker")]) if a.job_id != calm_job and a.num_restarts > 0]
    shards = list_tasks(address=cluster.address, filters=[("actor_id", "=", restarted.actor_id),
                                                          ("name", "=", "CovarianceWorker.collect")], limit=1000)
    last = {t.task_id: t for t in sorted(shards, key=attrgetter("attempt_number"))}  # each shard's last attempt
    assert len(last) == CORDA["samples"] // CORDA["num_workers"] and all(t.state == "FINISHED" for t in last.values())
    assert any(t.node_id != calibrate.node_id for t in last.values()), ("no shard was redone", remover.removals)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert calibrate.node_id not in alive and train.node_id not in alive and len(alive) == 2  # head + one worker

    record = json.loads(cli(state_dir, "status", job_id, "--json", check=True).stdout)
    assert record["state"] == "SUCCEEDED" and [s["state"] for s in record["stages"]] == ["succeeded"] * 5
    out = tmp_path / "out"
    cli(state_dir, "fetch", job_id, out, check=True)

    # The CorDA init is exactly the undisturbed one: every tensor and every number but the wall times.
    a, b = ours(calm), corda_tensors(out)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    reference = json.loads((calm.staging / "report" / "corda.json").read_text())
    assert _numbers(json.loads((out / "report" / "corda.json").read_text())) == _numbers(reference)

    # Training resumed from a checkpoint taken before its node went, and went on from there to the end.
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert len(summary["resumed_from"]) == 1 and 1 <= summary["resumed_from"][0] < MAX_STEPS, (summary, train)
    assert summary["nodes"] == [n for n in alive if n != cluster.head_node.node_id]  # on the last worker node
    metrics = [json.loads(line) for line in (out / "report" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _stop_driver(state_dir: Path) -> None:
    """A test that failed before its job ended leaves no driver behind."""
    for entry in (state_dir / "jobs").glob("*.json"):
        pid = json.loads(entry.read_text()).get("pid")
        if pid and process_running(pid):
            os.kill(pid, signal.SIGTERM)
            wait_gone(pid, timeout=30)


def test_layerwise_calibration_survives_losing_a_node(cluster, assets, tmp_path):
    """Layer-wise: the node of an actor inside a block goes; Ray restarts the actor on the spare node, which
    resumes its shards (from the checkpoint of its last completed block where that disk survives, else from the
    embeddings) — and the CorDA init is bit-identical to an undisturbed run's."""
    corda = {**CORDA, "shard_samples": 2, "batch_size": 2, "strategy": "layerwise"}
    runs = {}
    for name in ("calm", "disturbed"):
        spec = parse_spec(corda_job(assets, tmp_path / name, **corda))
        removed: list[tuple[int, str]] = []
        if name == "disturbed":
            threading.Thread(target=_remove_a_layerwise_node, args=(cluster, removed), daemon=True).start()
        runs[name] = run_stages(spec, tmp_path / name)
        if name == "disturbed":
            assert removed, "no layer-wise actor was caught inside a block"
            assert wait_gone(removed[0][0])
            # (whether the restarted actor had a block left depends on when in its last block the node went: the
            # process title can lag the call's end by a moment, so the identical outputs are what is asserted)
    calm, disturbed = ours(runs["calm"]), ours(runs["disturbed"])
    assert calm.keys() == disturbed.keys()
    assert all(torch.equal(calm[k], disturbed[k]) for k in calm)


def _remove_a_layerwise_node(cluster, removed: list, timeout: float = 120) -> None:
    """Remove the node of a layer-wise actor (one without a reducer beside it, if any) while it is inside a block."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers, reducers = _node_processes(cluster, b"ray::LayerwiseWorker", b"ray::Reducer")
        watched = [w for w in workers if w[1] not in {n for _, n in reducers}] or workers
        inside = [w for w in watched if cmdline(w[0]).startswith(b"ray::LayerwiseWorker.block")]
        if len(workers) == CORDA["num_workers"] and inside:
            node = next(n for n in cluster.list_all_nodes() if n.node_id == inside[0][1])
            cluster.remove_node(node, allow_graceful=False)
            removed.append(inside[0])
            return
        time.sleep(0.002)
