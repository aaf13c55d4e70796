"""Jobs on a real Ray cluster: a `ray start --head` with token auth and its dashboard on 127.0.0.1 (own temp dir,
stopped by its PID), reached with `peftfleet submit --address` and through the gateway (`peftfleet serve`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from tests.helpers import cli, free_port, tiny_spec, wait_gone, write_spec
from tests.live_cluster import call, gateway, ray_head, with_token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_endpoint):
    # Ray's pods read inputs in a bucket from the endpoint the AWS chain names (infra/ sets it)
    with ray_head(tmp_path_factory.mktemp("ray-head"), env={"AWS_ENDPOINT_URL_S3": s3_endpoint}) as running:
        yield running


def test_cli_runs_a_job_on_the_cluster_and_the_record_outlives_it(head, tmp_path, state_dir, assets, s3_endpoint,
                                                                  bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    spec = tiny_spec(assets, f"s3://{bucket}/runs", train={"max_steps": 4, "eval_every": None})
    spec["storage"].update(endpoint_url=s3_endpoint, region="us-east-1")
    spec = write_spec(tmp_path / "job.yaml", spec)

    # Without Ray's token, or with a wrong one: a clear error, and a record that says the job never started.
    missing = cli(state_dir, "submit", spec, "--address", head.address, env=with_token(None, home=tmp_path))
    assert missing.returncode == 1
    assert "requires its auth token and none was found" in missing.stderr and "RAY_AUTH_TOKEN" in missing.stderr
    job_id = re.search(r"--job-id (\S+)", missing.stderr).group(1)
    wrong = cli(state_dir, "submit", spec, "--address", head.address, env=with_token("not-the-token"))
    assert wrong.returncode == 1 and "rejected the auth token from RAY_AUTH_TOKEN" in wrong.stderr
    records = [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in
               s3.list_objects_v2(Bucket=bucket, Prefix="runs/jobs/")["Contents"] if o["Key"].endswith("job.json")]
    assert len(records) == 2 and all(r["state"] == "FAILED" and "not started" in r["error"] for r in records)

    # With the token, the failed job runs under its id, its driver a Ray job on the head.
    env = with_token(head.token)
    run = cli(state_dir, "submit", spec, "--address", head.address, "--job-id", job_id, "--wait", env=env)
    assert run.returncode == 0 and run.stdout.strip() == job_id, run.stderr[-3000:]
    assert "stage train: done" in run.stderr and f"job {job_id} SUCCEEDED" in run.stderr

    rec = json.loads(cli(state_dir, "status", job_id, "--json", env=env, check=True).stdout)
    assert rec["state"] == "SUCCEEDED" and rec["attempts"] == 2 and rec["driver"]["pid"] > 0
    log = cli(state_dir, "logs", job_id, env=env, check=True).stdout  # Ray's job log: the driver's stdout
    assert "stage upload: done" in log and "TrainController" not in log
    # library output went to the verbose log, which the driver uploaded to the bucket as it ended
    assert "TrainController" in cli(state_dir, "logs", job_id, "--verbose", env=env, check=True).stdout
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/jobs/{job_id}/")["Contents"]}
    assert {f"runs/jobs/{job_id}/{k}" for k in ("spec.yaml", "job.json", "manifest.json")} <= keys
    assert any(k.startswith(f"runs/jobs/{job_id}/train/") for k in keys)  # Ray Train's checkpoints, in the bucket
    fetched = cli(state_dir, "fetch", job_id, tmp_path / "out", "--kind", "adapter", env=env, check=True)
    assert "sha256 ok" in fetched.stderr and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "report").exists()

    # The cluster goes away (its address answers nothing): the record in the store still says how the job ended.
    entry_file = state_dir / "jobs" / f"{job_id}.json"
    entry = json.loads(entry_file.read_text())
    entry_file.write_text(json.dumps({**entry, "address": f"http://127.0.0.1:{free_port()}"}))
    status = cli(state_dir, "status", job_id, env=with_token(None), check=True)
    assert "SUCCEEDED" in status.stdout


def test_gateway_config_errors_name_the_file_and_field(tmp_path, state_dir):
    users = tmp_path / "users.yaml"
    users.write_text("users:\n  alice: not-a-digest\n")
    config = {"ray_address": "http://127.0.0.1:1", "storage": {"uri": f"file://{tmp_path / 'store'}"},
              "users_file": str(users), "data_root": str(tmp_path / "data")}
    bad_users = cli(state_dir, "serve", write_spec(tmp_path / "gateway.yaml", config))
    assert bad_users.returncode == 2 and f"{users}: users.alice: must be the sha256 hex digest" in bad_users.stderr
    # what the gateway and its jobs trust must not be where users put files
    for key, value in (("storage", {"uri": f"file://{tmp_path / 'data' / 'store'}"}),
                       ("state_dir", str(tmp_path / "data" / "state")),
                       ("node_cache_dir", str(tmp_path / "elsewhere" / ".." / "data" / "cache"))):
        inside = cli(state_dir, "serve", write_spec(tmp_path / "gateway.yaml", {**config, key: value}))
        assert inside.returncode == 2 and f"is inside data_root {tmp_path / 'data'}" in inside.stderr, inside.stderr
    del config["ray_address"]
    missing = cli(state_dir, "serve", write_spec(tmp_path / "gateway.yaml", config))
    assert missing.returncode == 2 and "gateway.yaml" in missing.stderr and "ray_address" in missing.stderr


# --- the gateway -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(head, assets, s3_endpoint, tmp_path_factory):
    import boto3

    bucket = f"pf-gw-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    storage = {"uri": f"s3://{bucket}/gw", "endpoint_url": s3_endpoint, "region": "us-east-1"}
    # alice may read inputs under s3://<bucket>/inputs; bob (his own limits) from no bucket
    limits = {"jobs_in_flight": 30, "workers": 30}
    root = tmp_path_factory.mktemp("gateway")
    with gateway(head, root, data_root=assets, storage=storage, node_cache_dir=str(root / "node-cache"),
                 limits={**limits, "input_prefixes": [f"s3://{bucket}/inputs"]}, user_limits={"bob": limits},
                 env={"AWS_ENDPOINT_URL_S3": s3_endpoint}) as running:
        running.bucket, running.s3_endpoint, running.ray_token = bucket, s3_endpoint, head.token
        yield running
    logged = running.log.read_text()
    assert not any(t in logged for t in [*running.tokens.values(), head.token]), "a token reached the gateway's log"


def gateway_spec(**train) -> dict:
    """A spec as a gateway user writes it: paths relative to the gateway's data root, no storage section."""
    return {"name": "gw", "model": {"path": "tiny-llama"},
            "data": {"format": "instruction", "train": "train.jsonl", "max_seq_len": 64},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
            "train": {"max_steps": 4, "micro_batch_size": 8, "log_every": 1, **train}}


def test_gateway_runs_a_sweep_streams_its_log_and_hands_out_verified_artifacts(gw):
    """A sweep over two tasks (two datasets), two trials at a time: the record shows each trial, the artifacts
    hold the bundle with one adapter per task, named for it."""
    spec = {**gateway_spec(), "sweep": {"tasks": {"upper": {}, "other": {"data.train": "eval.jsonl"}},
                                        "max_concurrent_trials": 2},
            "export": {"formats": ["adapter", "adapter_bundle"]}}
    spec["data"]["eval"] = "eval.jsonl"
    submitted = call(gw, "POST", "/v1/jobs", json={"spec": spec})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["job_id"]
    with call(gw, "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, stream=True) as streamed:
        log = "".join(streamed.iter_content(chunk_size=None, decode_unicode=True))  # ends when the job does
    assert "stage train: done" in log and "stage upload: done" in log and "sweep: best trial" in log
    record = call(gw, "GET", f"/v1/jobs/{job_id}").json()
    assert record["state"] == "SUCCEEDED"
    assert [(t["trial"], t["task"], t["state"]) for t in record["trials"]] == [("t00-upper", "upper", "finished"),
                                                                              ("t01-other", "other", "finished")]
    assert [j["job_id"] for j in call(gw, "GET", "/v1/jobs").json()] == [job_id]
    assert call(gw, "GET", "/v1/jobs", user="bob").json() == []
    for path in ("", "/logs", "/artifacts"):  # another user's job answers as an unknown one: 404, not 403
        theirs = call(gw, "GET", f"/v1/jobs/{job_id}{path}", user="bob")
        assert theirs.status_code == 404 and theirs.json() == call(gw, "GET", f"/v1/jobs/nope{path}").json() | {
            "detail": f"no job {job_id!r}"}
    for action in ("cancel", "retry"):
        assert call(gw, "POST", f"/v1/jobs/{job_id}/{action}", user="bob").status_code == 404
    assert call(gw, "POST", f"/v1/jobs/{job_id}/retry").status_code == 409  # SUCCEEDED: nothing to retry

    listing = call(gw, "GET", f"/v1/jobs/{job_id}/artifacts").json()
    assert {"adapter", "report", "trials", "adapter_bundle"} <= set(listing["artifacts"])
    assert listing["expires_in_s"] == 900
    for f in listing["files"]:  # presigned: plain GETs, no credentials
        body = requests.get(f["url"], timeout=30).content
        assert len(body) == f["size"] and hashlib.sha256(body).hexdigest() == f["sha256"], f["path"]
    assert any(f["path"].endswith("adapter/adapter_model.safetensors") for f in listing["files"])
    assert {f["path"] for f in listing["files"] if f["kind"] == "adapter_bundle"} >= {
        f"artifacts/adapter_bundle/{task}/adapter_model.safetensors" for task in ("upper", "other")}


def _cmdline(proc: Path) -> bytes:
    try:
        return proc.joinpath("cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def test_gateway_cancels_a_running_job_and_its_workers_go(gw):
    job_id = call(gw, "POST", "/v1/jobs", json={"spec": gateway_spec(max_steps=100_000)}).json()["job_id"]
    deadline, log = time.monotonic() + 180, ""
    while "train: step 2/" not in log:
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(1)
        log = call(gw, "GET", f"/v1/jobs/{job_id}/logs").text
    worker_pid = int(re.search(r"\(RayTrainWorker pid=(\d+)", log).group(1))
    drivers = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).startswith(
        b"python\0-m\0orchestrator.control.driver\0" + job_id.encode())]
    assert len(drivers) == 1
    for proc in (drivers[0], Path(f"/proc/{worker_pid}")):  # what the job runs inherits no Ray token
        environ = proc.joinpath("environ").read_bytes()
        assert b"RAY_AUTH_TOKEN_PATH=" in environ and gw.ray_token.encode() not in environ
    job = call(gw, "POST", f"/v1/jobs/{job_id}/cancel").json()
    assert job["state"] == "CANCELLED" and job["stage"] == "train", job
    assert wait_gone(worker_pid, timeout=60), "the training worker outlived the cancel"
    assert call(gw, "GET", f"/v1/jobs/{job_id}/artifacts").status_code == 409  # no manifest


@pytest.mark.parametrize("case", ["no token", "wrong token", "entrypoint", "runtime_env", "oversize",
                                  "oversize chunked", "bad field",
                                  "storage", "data_root", "unknown job"])
def test_gateway_refusals(gw, case):
    spec = gateway_spec()
    if case == "no token":
        response, expect = call(gw, "POST", "/v1/jobs", user=None, json={"spec": spec}), 401
    elif case == "wrong token":
        response = call(gw, "GET", "/v1/jobs", user=None, headers={"Authorization": "Bearer nope"})
        expect = 401
    elif case in ("entrypoint", "runtime_env"):
        body = {"spec": spec, case: "rm -rf /" if case == "entrypoint" else {"pip": ["evil"]}}
        response, expect = call(gw, "POST", "/v1/jobs", json=body), 422
        assert response.json()["detail"][0]["loc"] == ["body", case]
    elif case == "oversize":
        response, expect = call(gw, "POST", "/v1/jobs", json={"spec": {**spec, "pad": "x" * 70_000}}), 413
    elif case == "oversize chunked":  # no Content-Length to refuse up front: counted as it streams in
        body = (b"x" * 8192 for _ in range(10))
        response = call(gw, "POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"})
        expect = 413
    elif case == "bad field":
        response = call(gw, "POST", "/v1/jobs", json={"spec": {**spec, "adapter": {"method": "lora", "r": 0}}})
        expect = 422
        assert response.json()["detail"][0]["loc"] == ["body", "spec", "adapter", "r"], response.text
    elif case in ("storage", "data_root"):
        value = {"uri": "file:///tmp/x"} if case == "storage" else "/"
        response, expect = call(gw, "POST", "/v1/jobs", json={"spec": {**spec, case: value}}), 422
        assert "set by the gateway" in response.text and response.json()["detail"][0]["loc"][-1] == case
    else:
        response, expect = call(gw, "GET", "/v1/jobs/no-such-job"), 404
    assert response.status_code == expect, response.text
    assert not any(t in response.text for t in gw.tokens.values())


def _swept(spec: dict, grid: dict) -> dict:
    return {**spec, "sweep": {"grid": grid, "metric": "loss"}}


# what a user tried against the last review's fixes (issue 27): each is refused naming the field and the reason
ATTACKS = {
    # the cache and the spill folders are the deployment's: a spec naming one is refused, however it is spelled
    "node_cache_dir": (lambda s: {**s, "cluster": {"node_cache_dir": "../../../../var/anywhere"}},
                       "cluster.node_cache_dir", "set by the gateway"),
    "input_prefixes": (lambda s: {**s, "input_prefixes": ["s3://anything"]}, "input_prefixes", "set by the gateway"),
    "max_seq_len": (lambda s: {**s, "data": {**s["data"], "max_seq_len": 10**12}}, "data.max_seq_len",
                    "(limits.max_seq_len)"),
    "virtual tokens": (lambda s: {**s, "adapter": {"method": "prompt", "prompt": {"num_virtual_tokens": 10**9}}},
                       "adapter.prompt.num_virtual_tokens", "(limits.virtual_tokens)"),
    "calibration tokens": (lambda s: {**s, "data": {**s["data"], "calibration": "calibration.jsonl"},
                                      "init": {"method": "corda", "corda": {"samples": 10**6, "seq_len": 64}}},
                           "init.corda.samples", "(limits.calibration_tokens)"),
    "a trial's size": (lambda s: _swept(s, {"data.max_seq_len": [64, 10**9]}), "sweep",
                       "trial t01-max_seq_len1000000000: data.max_seq_len: 1000000000; at most"),
    "a trial's workers": (lambda s: _swept(s, {"train.num_workers": [1, 1000]}), "sweep",
                          "trial t01-num_workers1000: train.num_workers: 1000 workers"),
    "a name too long": (lambda s: {**s, "model": {"path": "a" * 5000}}, "model.path", "File name too long"),
    "a path too long": (lambda s: {**s, "model": {"path": "/".join(["b" * 255] * 20)}}, "model.path",
                        "File name too long"),
    "a folder of a listing": (lambda s: {**s, "data": {**s["data"], "train": "{mine}/listing-only"}},
                              "data.train.path", "and no files in"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_gateway_refuses_what_would_size_trust_or_crash_with_a_422(gw, inside_root, attack):
    (inside_root / "listing-only").mkdir()  # a folder whose only file is a (forged) listing
    (inside_root / "listing-only" / ".peftfleet-listing.json").write_text('{"uri": "s3://b/x", "files": {}}')
    change, loc, says = ATTACKS[attack]
    spec = json.loads(json.dumps(change(gateway_spec())).replace("{mine}", inside_root.name))
    response = call(gw, "POST", "/v1/jobs", json={"spec": spec})
    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", "spec", *loc.split(".")] and says in problem["msg"], problem


def test_gateway_data_root_confines_paths(gw, assets, tmp_path):
    outside = tmp_path / "model"
    shutil.copytree(assets / "tiny-llama", outside)
    response = call(gw, "POST", "/v1/jobs", json={"spec": {**gateway_spec(), "model": {"path": str(outside)}}})
    assert response.status_code == 422 and "outside the data root" in response.text
    assert response.json()["detail"][0]["loc"] == ["body", "spec", "model", "path"]


def test_gateway_reads_bucket_inputs_only_under_a_users_prefixes_and_checks_them_after(gw):
    """The cluster reads inputs with its own credentials: a bucket outside the user's limits.input_prefixes is
    refused before anything lists it (no such bucket exists here: a listing would have said so), one inside is
    listed and its missing keys named."""
    elsewhere = {**gateway_spec(), "model": {"path": "s3://someone-elses-bucket/llama"}}
    response = call(gw, "POST", "/v1/jobs", json={"spec": elsewhere})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "spec", "model", "path"]
    assert "is not under a prefix you may read inputs from (input_prefixes: " \
           f"s3://{gw.bucket}/inputs)" in response.text, response.text
    inside = {**gateway_spec(), "model": {"path": f"s3://{gw.bucket}/inputs/llama"}}
    assert "(input_prefixes: none)" in call(gw, "POST", "/v1/jobs", user="bob", json={"spec": inside}).text
    # a sweep's trials are inputs too: one trial naming another bucket is refused the same way, before listing
    swept = {**gateway_spec(), "sweep": {"grid": {"model.path": ["tiny-llama", "s3://someone-elses-bucket/m"]},
                                         "metric": "loss"}}
    response = call(gw, "POST", "/v1/jobs", json={"spec": swept})
    assert response.status_code == 422 and "someone-elses-bucket/m is not under a prefix" in response.text
    response = call(gw, "POST", "/v1/jobs", json={"spec": inside})
    assert response.status_code == 422 and f"no objects under s3://{gw.bucket}/inputs/llama/" in response.text


def test_twenty_concurrent_submissions_are_all_recorded(gw):
    import boto3

    # A driver that needs more CPUs than the cluster has waits in Ray's queue: submissions are recorded, nothing runs.
    spec = {**gateway_spec(), "cluster": {"driver_cpus": 64}}
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: call(gw, "POST", "/v1/jobs", user="bob", json={"spec": spec}),
                                  range(20)))
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    ids = {r.json()["job_id"] for r in responses}
    assert len(ids) == 20
    assert {j["job_id"] for j in call(gw, "GET", "/v1/jobs", user="bob").json()} == ids
    s3 = boto3.client("s3", endpoint_url=gw.s3_endpoint)
    for job_id in ids:
        record = json.loads(s3.get_object(Bucket=gw.bucket, Key=f"gw/jobs/{job_id}/job.json")["Body"].read())
        assert record["state"] == "PENDING" and record["owner"] == "bob"
    with ThreadPoolExecutor(5) as pool:
        cancelled = list(pool.map(lambda j: call(gw, "POST", f"/v1/jobs/{j}/cancel", user="bob").json(), ids))
    assert {c["state"] for c in cancelled} == {"CANCELLED"}


# --- follows that cannot starve the server, submissions that are never lost ------------------------------------


def waiting_job(gw, user: str = "alice") -> str:
    """A job whose driver waits in Ray's queue (it asks for more CPUs than the cluster has): PENDING for good."""
    spec = {**gateway_spec(), "cluster": {"driver_cpus": 64}}
    response = call(gw, "POST", "/v1/jobs", user=user, json={"spec": spec})
    assert response.status_code == 201, response.text
    return response.json()["job_id"]


def follow(gw, job_id: str, user: str = "alice") -> requests.Response:
    """A log stream, open until closed (the response comes back as soon as its headers do)."""
    return call(gw, "GET", f"/v1/jobs/{job_id}/logs", user=user, params={"follow": "true"}, stream=True, timeout=30)


def quick(gw, user: str, within_s: float = 2.0) -> float:
    start = time.monotonic()
    assert call(gw, "GET", "/v1/jobs", user=user, timeout=within_s).status_code == 200
    return time.monotonic() - start


def test_log_followers_are_capped_gone_with_their_clients_and_starve_no_one(gw):
    mine = [waiting_job(gw) for _ in range(4)]
    bobs = waiting_job(gw, "bob")
    streams = [follow(gw, mine[0]), follow(gw, mine[0])]
    assert all(s.status_code == 200 for s in streams)
    third = follow(gw, mine[0])
    assert third.status_code == 429 and "max_followers_per_job" in third.text
    streams += [follow(gw, job) for job in (mine[1], mine[1], mine[2], mine[2])]
    assert [s.status_code for s in streams] == [200] * 6
    seventh = follow(gw, mine[3])
    assert seventh.status_code == 429 and "max_followers_per_user" in seventh.text
    theirs = follow(gw, bobs, user="bob")  # one user's streams leave the others theirs
    assert theirs.status_code == 200
    quick(gw, "bob"), quick(gw, "alice")
    assert call(gw, "GET", "/readyz").json()["log_streams"] == 7

    for s in streams:  # clients that go away give their slots back
        s.close()
    deadline = time.monotonic() + 30
    while call(gw, "GET", "/readyz").json()["log_streams"] != 1:
        assert time.monotonic() < deadline, "closed streams kept their slots"
        time.sleep(0.5)
    again = follow(gw, mine[3])
    assert again.status_code == 200
    again.close(), theirs.close()
    for user, jobs in (("alice", mine), ("bob", [bobs])):
        for job_id in jobs:
            assert call(gw, "POST", f"/v1/jobs/{job_id}/cancel", user=user).json()["state"] == "CANCELLED"


def test_a_log_stream_ends_after_its_time_and_says_where_to_go_on(head, assets, s3_endpoint, tmp_path):
    storage = {"uri": f"file://{tmp_path / 'store'}"}
    # Two call threads and ten streams: a waiting stream holds no thread, so the others are still served.
    with gateway(head, tmp_path, data_root=assets, storage=storage, call_threads=2, follow_max_s=4,
                 max_followers_per_user=20, max_followers_per_job=20) as small:
        job_id = waiting_job(small)
        streams = [follow(small, job_id) for _ in range(10)]
        assert [s.status_code for s in streams] == [200] * 10
        assert max(quick(small, "alice") for _ in range(5)) < 2.0
        texts = [s.text for s in streams]  # each ends by itself after follow_max_s
        assert all("a log stream lasts at most 4 s; follow again from offset=" in t for t in texts), texts[0]
        assert call(small, "POST", f"/v1/jobs/{job_id}/cancel").json()["state"] == "CANCELLED"


def test_a_submission_ray_refuses_is_kept_and_its_owner_can_retry_it(head, assets, tmp_path):
    from tests.fault_proxy import FaultProxy

    # The gateway reaches Ray through a proxy that answers every job submission 503 until told otherwise.
    proxy = FaultProxy(int(head.address.rsplit(":", 1)[1]), fault="503", match="POST /api/jobs")
    ray = SimpleNamespace(address=proxy.endpoint, token=head.token)
    with gateway(ray, tmp_path, data_root=assets, storage={"uri": f"file://{tmp_path / 'store'}"}) as small:
        refused = call(small, "POST", "/v1/jobs", json={"spec": gateway_spec()})
        assert refused.status_code == 503, refused.text
        detail = refused.json()["detail"]
        job_id = detail["job_id"]
        assert f"POST /v1/jobs/{job_id}/retry" in detail["msg"] and "--job-id" not in detail["msg"]
        listed = call(small, "GET", "/v1/jobs").json()
        assert [(j["job_id"], j["state"]) for j in listed] == [(job_id, "FAILED")]
        assert "not started" in call(small, "GET", f"/v1/jobs/{job_id}").json()["error"]
        assert call(small, "POST", f"/v1/jobs/{job_id}/retry", user="bob").status_code == 404

        proxy.fault = None  # the cluster answers again
        retried = call(small, "POST", f"/v1/jobs/{job_id}/retry")
        assert retried.status_code == 201 and retried.json()["job_id"] == job_id, retried.text
        assert call(small, "POST", f"/v1/jobs/{job_id}/retry").status_code == 409  # running: cancel it first
        deadline = time.monotonic() + 240
        while (job := call(small, "GET", f"/v1/jobs/{job_id}").json())["state"] not in ("SUCCEEDED", "FAILED"):
            assert time.monotonic() < deadline, job
            time.sleep(1)
        assert job["state"] == "SUCCEEDED" and job["attempts"] == 2, job


# --- files that lead outside the data root ----------------------------------------------------------------------

SECRET = "/proc/self/environ"  # the reading process's environment: on the Ray pods, where tokens would be


@pytest.fixture
def inside_root(assets):
    """A model folder (with its tokenizer) inside the gateway's data root, for one test to tamper with."""
    folder = assets / f"attack-{secrets.token_hex(4)}"
    shutil.copytree(assets / "tiny-llama", folder / "model")
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("attack", ["tokenizer file", "index entry", "dataset file", "deepspeed config",
                                    "deepspeed keys"])
def test_gateway_refuses_files_inside_named_folders_that_lead_outside_its_root(gw, inside_root, attack):
    rel, spec = inside_root.name, gateway_spec()
    spec["model"] = {"path": f"{rel}/model"}
    loc = ["model", "path"]
    if attack == "tokenizer file":  # save_pretrained in the export would write it into a downloadable artifact
        (inside_root / "model" / "chat_template.jinja").unlink()
        (inside_root / "model" / "chat_template.jinja").symlink_to(SECRET)
    elif attack == "index entry":
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "/etc/passwd"}}
        (inside_root / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    elif attack == "dataset file":
        (inside_root / "ds").mkdir()
        (inside_root / "ds" / "data-00000-of-00001.arrow").symlink_to(SECRET)
        spec["data"]["train"], loc = f"{rel}/ds", ["data", "train", "path"]
    elif attack == "deepspeed config":
        (inside_root / "ds.json").symlink_to(SECRET)
        spec["train"]["deepspeed_config"], loc = f"{rel}/ds.json", ["train", "deepspeed_config"]
    else:  # DeepSpeed would write where this says
        profiler = {"flops_profiler": {"enabled": True, "output_file": str(inside_root / "out")}}
        (inside_root / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, **profiler}))
        spec["train"]["deepspeed_config"], loc = f"{rel}/ds.json", ["train", "deepspeed_config"]
    response = call(gw, "POST", "/v1/jobs", json={"spec": spec})
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "spec", *loc], problem
    said = {"index entry": "which is not a file inside", "deepspeed keys": "sets flops_profiler, which a job with "
            "a data_root (every gateway job) may not"}.get(attack, "outside the data root")
    assert said in problem["msg"], problem
    assert "RAY_AUTH" not in response.text and SECRET not in response.text


def test_a_folder_swapped_for_a_link_after_the_gateway_checked_it_fails_the_job(gw, inside_root):
    import boto3

    spec = {**gateway_spec(), "model": {"path": f"{inside_root.name}/model"}}
    submitted = call(gw, "POST", "/v1/jobs", json={"spec": spec})
    assert submitted.status_code == 201, submitted.text
    template = inside_root / "model" / "chat_template.jinja"
    template.unlink()  # the driver takes seconds to start: this is long done when it checks
    template.symlink_to(SECRET)
    job_id = submitted.json()["job_id"]
    deadline = time.monotonic() + 180
    while (job := call(gw, "GET", f"/v1/jobs/{job_id}").json())["state"] not in ("SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["state"] == "FAILED" and "chat_template.jinja" in job["error"] and "outside" in job["error"], job
    assert call(gw, "GET", f"/v1/jobs/{job_id}/artifacts").status_code == 409
    s3 = boto3.client("s3", endpoint_url=gw.s3_endpoint)
    for obj in s3.list_objects_v2(Bucket=gw.bucket, Prefix=f"gw/jobs/{job_id}/")["Contents"]:
        body = s3.get_object(Bucket=gw.bucket, Key=obj["Key"])["Body"].read()
        assert gw.ray_token.encode() not in body and b"RAY_AUTH_TOKEN_PATH" not in body, obj["Key"]


# --- what the last review's attacker still got (issue 27) -----------------------------------------------------


def wait_ended(gw, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (job := call(gw, "GET", f"/v1/jobs/{job_id}").json())["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    return job


def chat(text: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]})


def test_a_forged_listing_reads_nothing_it_names_and_the_error_says_one_line(gw, inside_root):
    """The attack: a data folder holding the user's own records and a `.peftfleet-listing.json` that names another
    user's objects in the cluster's bucket and a file outside the data root, with a chat template that raises an
    exception quoting the records it renders. The listing is not one this node wrote, so it is no listing: the
    job reads the user's own records only, and its error (one line, no traceback) quotes nothing else."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=gw.s3_endpoint)
    bobs = (chat("BOB-SECRET-ANSWER-0: api_key=sk-bob") + "\n").encode()
    s3.put_object(Bucket=gw.bucket, Key="bob-private/train.jsonl", Body=bobs)
    outside = gw.root / "outside.jsonl"
    outside.write_text(chat("OUTSIDE-THE-ROOT") + "\n")
    (inside_root / "ds").mkdir()
    (inside_root / "ds" / "a.jsonl").write_text(chat("ALICE-OWN-RECORD") + "\n")
    etag = s3.head_object(Bucket=gw.bucket, Key="bob-private/train.jsonl")["ETag"].strip('"')
    forged = {"uri": f"s3://{gw.bucket}/bob-private", "cache": [str(gw.root / "node-cache"), None, 5, 60, None],
              "files": {"train.jsonl": [len(bobs), etag, ""],
                        os.path.relpath(outside, inside_root / "ds"): [outside.stat().st_size, "", ""]}}
    (inside_root / "ds" / ".peftfleet-listing.json").write_text(json.dumps(forged))
    template = "{{ raise_exception('rendered: ' ~ (messages | string)) }}"
    (inside_root / "model" / "chat_template.jinja").write_text(template)
    spec = {**gateway_spec(), "model": {"path": f"{inside_root.name}/model"}}
    spec["data"] = {"format": "chat", "train": f"{inside_root.name}/ds", "max_seq_len": 64}
    submitted = call(gw, "POST", "/v1/jobs", json={"spec": spec})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["job_id"]
    job = wait_ended(gw, job_id)
    log = call(gw, "GET", f"/v1/jobs/{job_id}/logs").text
    assert job["state"] == "FAILED" and "ALICE-OWN-RECORD" in job["error"], job  # the channel is real
    for text in (job["error"], log):
        assert "BOB-SECRET" not in text and "OUTSIDE-THE-ROOT" not in text
        assert "Traceback" not in text and "site-packages" not in text and 'File "/' not in text
    assert "\n" not in job["error"] and re.search(r"\[error [0-9a-f]{8}: its traceback is in the job's verbose log",
                                                 job["error"]), job["error"]
    ref = re.search(r"\[error ([0-9a-f]{8})", job["error"]).group(1)
    verbose = s3.get_object(Bucket=gw.bucket, Key=f"gw/jobs/{job_id}/verbose.log")["Body"].read().decode()
    assert f"error {ref}: stage train failed:\nTraceback" in verbose  # for whoever runs the cluster
    # the gateway's index names every job's owner: only the gateway's user may read it
    index = list((gw.root / "state" / "jobs").glob("*.json"))
    assert index and all(f.stat().st_mode & 0o077 == 0 for f in index)
    assert (gw.root / "state" / "jobs").stat().st_mode & 0o077 == 0


def test_layerwise_spills_tensors_in_the_deployments_cache_and_a_bucket_covariance_works(gw):
    """Layer-wise calibration through the gateway spills hidden states (safetensors, nothing unpickled) in the
    gateway's node cache, never a folder the spec names; its covariance, copied under the user's input prefix,
    is reused from the bucket by a second job (init.corda.covariance_from: s3://)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=gw.s3_endpoint)
    corda = {"samples": 16, "seq_len": 64, "strategy": "layerwise", "actor_memory_gib": 0.01,
             "save_covariance": True, "fidelity_samples": 2}
    spec = {**gateway_spec(), "init": {"method": "corda", "corda": corda}, "stages": ["calibrate", "decompose"]}
    spec["data"]["calibration"] = "calibration.jsonl"
    first = call(gw, "POST", "/v1/jobs", json={"spec": spec}).json()["job_id"]
    assert wait_ended(gw, first)["state"] == "SUCCEEDED", call(gw, "GET", f"/v1/jobs/{first}").json()
    log = call(gw, "GET", f"/v1/jobs/{first}/logs").text
    assert "each keeps only the shard at work in memory" in log
    assert not list((gw.root / "node-cache" / "layerwise").rglob("*"))  # spill folders made fresh, then removed
    prefix = f"gw/jobs/{first}/artifacts/covariance/"
    for obj in s3.list_objects_v2(Bucket=gw.bucket, Prefix=prefix)["Contents"]:
        s3.copy_object(Bucket=gw.bucket, Key=f"inputs/cov-{first}/{obj['Key'].removeprefix(prefix)}",
                       CopySource={"Bucket": gw.bucket, "Key": obj["Key"]})
    corda = {"samples": 16, "seq_len": 64, "covariance_from": f"s3://{gw.bucket}/inputs/cov-{first}",
             "fidelity_samples": 2}
    second = call(gw, "POST", "/v1/jobs", json={"spec": {**spec, "init": {"method": "corda", "corda": corda}}})
    assert second.status_code == 201, second.text
    job_id = second.json()["job_id"]
    job = wait_ended(gw, job_id)
    assert job["state"] == "SUCCEEDED", job["error"]
    assert "loaded from s3://" in call(gw, "GET", f"/v1/jobs/{job_id}/logs").text


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_a_sweep_too_big_to_build_is_refused_from_its_lengths(gw):
    """3 paths × 200 values is 8 million trials: refused before one is built, and the gateway's memory stays."""
    before = _peak_rss_mib(gw.pid)
    grid = {"train.learning_rate": [1e-4 * (i + 1) for i in range(200)], "train.seed": list(range(200)),
            "adapter.r": list(range(1, 201))}
    huge = call(gw, "POST", "/v1/jobs", json={"spec": {**gateway_spec(), "sweep": {"grid": grid}}}, timeout=30)
    assert huge.status_code == 422 and "8000000 trials (1 task(s) × 8000000) exceed sweep.max_trials 16" in \
        huge.text, huge.text
    # a budget raised to match is still past the user's limit: 16 × 10^12 trials in 44 KB of JSON
    grid = {path: list(range(1, 2001)) for path in ("train.seed", "adapter.r", "train.max_steps", "train.warmup_steps")}
    wide = {**gateway_spec(), "sweep": {"grid": grid, "max_trials": 10**18}}
    raised = call(gw, "POST", "/v1/jobs", json={"spec": wide}, timeout=30)
    assert raised.status_code == 422 and "16000000000000 trials; one sweep may have at most 16 (limits.trials)" in \
        raised.text, raised.text
    assert _peak_rss_mib(gw.pid) - before < 50


def test_slow_clients_are_dropped_and_sockets_are_capped(head, assets, tmp_path):
    """200 sockets that each send a header line every half second (a request that never ends): each is closed
    once request_timeout_s is up, sockets past max_connections at once; the gateway answers again after."""
    import socket

    with gateway(head, tmp_path, data_root=assets, storage={"uri": f"file://{tmp_path / 'store'}"},
                 request_timeout_s=2, max_connections=40) as small:
        fds = len(list(Path(f"/proc/{small.pid}/fd").iterdir()))
        port = int(small.url.rsplit(":", 1)[1])
        socks = []
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
            socks.append(sock)
        start, closed = time.monotonic(), {}
        while len(closed) < len(socks) and time.monotonic() - start < 15:
            for i, sock in enumerate(socks):
                if i in closed:
                    continue
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    sock.settimeout(0.01)
                    if sock.recv(1024) == b"":
                        closed[i] = time.monotonic() - start
                except TimeoutError:
                    pass
                except OSError:
                    closed[i] = time.monotonic() - start
            time.sleep(0.5)
        for sock in socks:
            sock.close()
        assert len(closed) == 200, f"{200 - len(closed)} slow sockets still open after 15 s"
        assert sum(t < 1.5 for t in closed.values()) >= 150  # past the cap: closed at once
        assert max(closed.values()) < 6  # the others: once their 2 s were up
        assert call(small, "GET", "/readyz", user=None).status_code == 200
        assert len(list(Path(f"/proc/{small.pid}/fd").iterdir())) <= fds + 2


# --- quotas -----------------------------------------------------------------------------------------------------


def test_limits_refuse_what_a_user_may_never_have_and_what_they_hold_already_and_deadlines_cancel(
        head, assets, tmp_path):
    limits = {"jobs_in_flight": 2, "workers": 3, "gpus": 0, "steps": 100_000, "job_hours": 0.01, "artifact_gib": 1e-5,
              "merge_alphas": 2}
    with gateway(head, tmp_path, data_root=assets, storage={"uri": f"file://{tmp_path / 'store'}"},
                 limits=limits, deadline_poll_s=1) as small:
        def post(spec: dict, user: str = "alice") -> requests.Response:
            return call(small, "POST", "/v1/jobs", user=user, json={"spec": spec})

        # an hour of steps even on an idle machine (1000 took 25 s there: a race with the 36 s deadline)
        spec = gateway_spec(max_steps=100_000)
        for change, loc, says in [
            ({"train": {**spec["train"], "num_workers": 4}}, ["train", "num_workers"], "limits.workers"),
            ({"train": {**spec["train"], "use_gpu": True}}, ["train", "use_gpu"], "limits.gpus"),
            ({"train": {**spec["train"], "max_steps": 100_001}}, ["train", "max_steps"], "limits.steps"),
            ({"export": {"formats": ["adapter"], "merge_alphas": [0.25, 0.5, 1.0]}}, ["export", "merge_alphas"],
             "limits.merge_alphas"),
            ({"export": {"formats": ["adapter", "merged"]}}, ["export", "formats"], "limits.artifact_gib")]:
            refused = post({**spec, **change})
            assert refused.status_code == 422, refused.text
            [problem] = refused.json()["detail"]
            assert problem["loc"] == ["body", "spec", *loc] and says in problem["msg"], problem

        waiting = {"cluster": {"driver_cpus": 64}}  # queued in Ray for good: in flight until cancelled
        two = {**spec, **waiting, "train": {**spec["train"], "num_workers": 2}}
        one = {**spec, **waiting}
        first = post(two)
        assert first.status_code == 201, first.text
        over = post(two)
        assert over.status_code == 429 and "hold 2 workers; this one needs 2 more, past 3 (limits.workers)" in \
            over.json()["detail"], over.text
        second = post(one)
        assert second.status_code == 201, second.text
        third = post(one)
        assert third.status_code == 429 and "limits.jobs_in_flight" in third.text, third.text
        runs = post(spec, user="bob")  # alice's jobs hold nothing of bob's; his runs, until its deadline
        assert runs.status_code == 201, runs.text
        bobs = runs.json()["job_id"]
        frozen = yaml.safe_load((tmp_path / "store" / "jobs" / bobs / "spec.yaml").read_text())
        assert frozen["cluster"]["driver_cpus"] == 1.0  # raised to min_driver_cpus: drivers cannot pile up

        ids = [(first.json()["job_id"], "alice"), (second.json()["job_id"], "alice"), (bobs, "bob")]
        deadline = time.monotonic() + 180
        while not all((job := call(small, "GET", f"/v1/jobs/{j}", user=u).json())["state"] == "CANCELLED"
                      for j, u in ids):
            assert time.monotonic() < deadline, job
            time.sleep(1)
        for j, u in ids:
            assert "past its deadline" in call(small, "GET", f"/v1/jobs/{j}", user=u).json()["error"]
        assert post(one).status_code == 201  # ended jobs hold nothing


# --- the CLI against a gateway ----------------------------------------------------------------------------------


def test_the_cli_works_through_a_gateway_with_a_token_from_the_environment_or_a_file(
        head, assets, s3_endpoint, bucket, tmp_path, state_dir):
    storage = {"uri": f"s3://{bucket}/cli", "endpoint_url": s3_endpoint, "region": "us-east-1"}
    # Streams end every 4 s: `logs --follow` must carry on across them and print the log once, whole.
    with gateway(head, tmp_path, data_root=assets, storage=storage, follow_max_s=4) as gw:
        alice = with_token(None) | {"PEFTFLEET_TOKEN": gw.tokens["alice"]}

        def peftfleet(*args, env=alice, **kwargs):
            return cli(state_dir, "--gateway", gw.url, *args, env=env, **kwargs)

        spec = write_spec(tmp_path / "job.yaml", gateway_spec(max_steps=30))
        submitted = peftfleet("submit", spec, "--wait", timeout=400)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job_id = submitted.stdout.strip()
        assert "stage upload: done" in submitted.stderr and f"job {job_id} SUCCEEDED" in submitted.stderr
        assert "[peftfleet gateway]" not in submitted.stderr
        whole = peftfleet("logs", job_id, check=True).stdout
        followed = peftfleet("logs", job_id, "--follow", check=True).stdout
        assert followed == whole and "train: step 30/30" in whole
        assert whole in submitted.stderr  # --wait followed it across several streams: nothing lost or repeated
        assert "SUCCEEDED" in peftfleet("status", job_id, check=True).stdout
        assert json.loads(peftfleet("status", job_id, "--json", check=True).stdout)["state"] == "SUCCEEDED"
        assert job_id in peftfleet("list", check=True).stdout
        assert "adapter_model.safetensors" in peftfleet("artifacts", job_id, check=True).stdout
        fetched = peftfleet("fetch", job_id, tmp_path / "out", "--kind", "adapter", check=True)
        assert "sha256 ok" in fetched.stderr and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
        report = peftfleet("report", job_id, "--dest", tmp_path / "report", check=True)
        assert Path(report.stdout.strip()).is_file()
        assert "already SUCCEEDED" in peftfleet("cancel", job_id, check=True).stdout

        # the token from a file only its owner can read; none at all; someone else's job; a bad spec
        token_file = tmp_path / "token"
        token_file.write_text(gw.tokens["bob"])
        token_file.chmod(0o644)
        bob = ["--token-file", str(token_file)]
        loose = cli(state_dir, "--gateway", gw.url, *bob, "list", env=with_token(None))
        assert loose.returncode == 2 and "chmod 600" in loose.stderr
        token_file.chmod(0o600)
        assert cli(state_dir, "--gateway", gw.url, *bob, "list", env=with_token(None), check=True).stdout.count(
            "\n") <= 1  # bob's list: a header, no jobs
        theirs = cli(state_dir, "--gateway", gw.url, *bob, "status", job_id, env=with_token(None))
        assert theirs.returncode == 2 and f"no job {job_id!r}" in theirs.stderr
        none = cli(state_dir, "--gateway", gw.url, "--token-file", str(tmp_path / "nope"), "list",
                   env=with_token(None))
        assert none.returncode == 2 and "PEFTFLEET_TOKEN" in none.stderr
        bad = peftfleet("submit", write_spec(tmp_path / "bad.yaml", {**gateway_spec(), "adapter": {"r": 0}}))
        assert bad.returncode == 2 and "adapter.r:" in bad.stderr, bad.stderr
        assert gw.tokens["alice"] not in submitted.stderr + whole + bad.stderr


def test_readiness_says_so_while_the_call_pool_is_wedged(head, assets, s3_endpoint, bucket, tmp_path):
    from tests.fault_proxy import FaultProxy

    # Every GET to the store hangs for 15 s (a hung server), and the gateway has one call thread.
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]), fault="stall", match="GET /", stall_s=15)
    storage = {"uri": f"s3://{bucket}/wedge", "endpoint_url": proxy.endpoint, "region": "us-east-1",
               "max_attempts": 1}
    with contextlib.closing(proxy), gateway(head, tmp_path, data_root=assets, storage=storage,
                                            call_threads=1) as gw:
        assert call(gw, "GET", "/readyz", user=None).status_code == 200
        entry = {"job_id": "wedged", "storage": storage, "address": head.address, "owner": "alice"}
        (tmp_path / "state" / "jobs").mkdir(parents=True, exist_ok=True)
        (tmp_path / "state" / "jobs" / "wedged.json").write_text(json.dumps(entry))
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(call, gw, "GET", "/v1/jobs/wedged")  # its store read holds the only thread
            deadline = time.monotonic() + 10
            while (ready := call(gw, "GET", "/readyz", user=None, timeout=10)).status_code == 200:
                assert time.monotonic() < deadline, "readiness stayed green with the call pool wedged"
                time.sleep(0.2)
            assert ready.status_code == 503 and "call pool" in ready.json()["detail"]
            assert stuck.result().status_code == 503  # the store did not answer, and the job says so
        proxy.fault = None
        assert call(gw, "GET", "/readyz", user=None).status_code == 200
