"""Shared fixtures: the tiny model and data (built once, locally), a real S3 HTTP server on loopback, and an
isolated peftfleet state dir per test. Nothing here mocks Ray, peft or boto3."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

# No hub, one thread per process (2-core machines run Ray workers beside pytest), dummy credentials that only
# the loopback S3 server ever sees. Set before anything imports transformers or boto3; subprocesses inherit them.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    OMP_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    RAY_DEDUP_LOGS="0",
)

from tests.helpers import free_port  # after the environment: it imports our modules

_EXIT_STATUS = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    from jobspecs.examples.build_assets import build_assets

    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server over real HTTP on 127.0.0.1 — the code path MinIO or AWS takes."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    import boto3

    name = f"pf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture(scope="module")
def local_ray():
    """A private embedded Ray for one test module (shut down after it). Four logical CPUs on two cores: the
    CorDA tests run up to three covariance actors; their work is small."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024**2,
             configure_logging=False)
    yield
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown once Ray has run in this process. Native threads of Ray's core
    worker can outlive ray.shutdown() and crash that teardown (ray-project/ray#31145), turning a run whose every
    test passed into exit 139. By now pytest has reported everything (this hook runs last), so its own exit status
    is the truth."""
    if "ray" in sys.modules and _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])
