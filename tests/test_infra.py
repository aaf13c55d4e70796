"""infra/: every manifest parses, and the pieces are wired to each other and to the code they run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import ray
import yaml

from jobspecs import parse_spec
from orchestrator.api.cli import build_parser
from orchestrator.api.gateway import GatewayConfig

INFRA = Path(__file__).resolve().parents[1] / "infra"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def by_kind(name: str, kind: str) -> list[dict]:
    return [d for d in documents(name) if d["kind"] == kind]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def cluster() -> dict:
    (raycluster,) = by_kind("k8s/raycluster.yaml", "RayCluster")
    return raycluster


def all_pods() -> list[dict]:
    spec = cluster()["spec"]
    (job,) = by_kind("k8s/rayjob.yaml", "RayJob")
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"]),
            job["spec"]["submitterPodTemplate"]]


def test_every_manifest_parses():
    for path in [*INFRA.glob("k8s/*.yaml"), *INFRA.glob("vm/*.yaml")]:
        assert documents(str(path.relative_to(INFRA))), path


def test_one_image_and_the_tested_ray_version_everywhere():
    images = {c["image"] for pod in all_pods() for c in containers(pod)}
    launcher = documents("vm/ray-cluster-launcher.yaml")[0]
    assert images | {launcher["docker"]["image"]} == {"peftfleet:0.1.0-cpu", "peftfleet:0.1.0-gpu"}
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in dockerfile and cluster()["spec"]["rayVersion"] == ray.__version__
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${FLAVOR}" in dockerfile
    # the image installs exactly the packages pyproject declares
    for package in ("jobspecs", "orchestrator", "workers"):
        assert f"COPY --chown=ray:users {package} {package}" in dockerfile


def test_gpu_workers_ask_for_gpus_and_the_head_runs_no_gpu_work():
    spec = cluster()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        (worker,) = containers(group["template"])
        assert worker["image"].endswith("-gpu") and worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_secret_reference_exists_and_token_auth_is_on_every_ray_pod():
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind("k8s/secrets.example.yaml", "Secret")}
    refs = []
    for name in ("k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/minio.yaml", "k8s/gateway.yaml"):
        text = (INFRA / name).read_text()
        refs += re.findall(r"secretKeyRef: \{name: ([\w-]+), key: (\w+)\}", text)
    assert refs and all(key in secrets.get(secret, set()) for secret, key in refs), refs
    for pod in all_pods():
        env = {e["name"]: e for c in containers(pod) for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env


def test_the_ray_pods_give_the_processes_they_start_no_secret_in_their_environment():
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind("k8s/secrets.example.yaml", "Secret")}
    spec = cluster()["spec"]
    for pod in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        (container,) = containers(pod)
        env = {e["name"]: e for e in container["env"]}
        assert not any("valueFrom" in e for e in env.values()), "a secret in a Ray pod's environment"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for variable, secret in (("RAY_AUTH_TOKEN_PATH", "peftfleet-ray-token"),
                                 ("AWS_SHARED_CREDENTIALS_FILE", "peftfleet-s3")):
            path = Path(env[variable]["value"])
            mount = mounts[str(path.parent)]
            volume = volumes[mount["name"]]["secret"]
            assert mount["readOnly"] and volume["secretName"] == secret and volume["defaultMode"] == 0o400
            assert path.name in secrets[secret] and not path.is_relative_to("/data")  # outside the data root


def test_the_dashboard_is_not_exposed_outside_the_cluster():
    assert cluster()["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    services = [d for name in ("k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/minio.yaml", "k8s/gateway.yaml")
                for d in by_kind(name, "Service")]
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)
    assert not any(d["kind"] == "Ingress" for name in INFRA.glob("k8s/*.yaml")
                   for d in documents(str(name.relative_to(INFRA))))
    launcher = documents("vm/ray-cluster-launcher.yaml")[0]
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])


def test_rayjob_runs_a_valid_peftfleet_command_on_a_valid_spec_wired_to_minio():
    (job,) = by_kind("k8s/rayjob.yaml", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster()["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "peftfleet"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "submit" and args.wait
    # the spec comes from the ConfigMap the head mounts at /specs
    head = cluster()["spec"]["headGroupSpec"]["template"]
    (mount,) = [m for m in containers(head)[0]["volumeMounts"] if m["name"] == "jobspecs"]
    (volume,) = [v for v in head["spec"]["volumes"] if v["name"] == "jobspecs"]
    (configmap,) = by_kind("k8s/rayjob.yaml", "ConfigMap")
    assert configmap["metadata"]["name"] == volume["configMap"]["name"]
    spec_file = Path(args.spec)
    assert spec_file.parent == Path(mount["mountPath"]) and spec_file.name in configmap["data"]
    spec = parse_spec(yaml.safe_load(configmap["data"][spec_file.name]), source=str(spec_file), check_files=False)
    assert spec.cluster.address == "auto" and str(spec.model.path).startswith("/data/")
    # ...and its storage is the MinIO Service and the bucket the bucket Job creates
    (service,) = by_kind("k8s/minio.yaml", "Service")
    assert spec.storage.endpoint_url == f"http://{service['metadata']['name']}.default.svc.cluster.local:" \
                                        f"{service['spec']['ports'][0]['port']}"
    (bucket_job,) = by_kind("k8s/minio.yaml", "Job")
    bucket = spec.storage.uri.removeprefix("s3://").split("/")[0]
    assert f"mc mb --ignore-existing store/{bucket}" in " ".join(containers(bucket_job["spec"]["template"])[0]["args"])


def test_gateway_holds_the_ray_token_serves_its_config_and_reaches_the_head_and_minio():
    (deployment,) = by_kind("k8s/gateway.yaml", "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = containers(pod)
    assert container["image"] == "peftfleet:0.1.0-cpu"
    args = build_parser().parse_args(container["command"][1:])
    assert container["command"][0] == "peftfleet" and args.command == "serve"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (configmap,) = by_kind("k8s/gateway.yaml", "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert mounts["config"]["mountPath"] == str(args.config) and mounts["config"]["subPath"] in configmap["data"]
    config = GatewayConfig.model_validate(yaml.safe_load(configmap["data"][mounts["config"]["subPath"]]))
    # users file from its Secret, the data root and the job index on volumes
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in by_kind("k8s/secrets.example.yaml", "Secret")}
    assert config.users_file.parent == Path(mounts["users"]["mountPath"])
    assert config.users_file.name in secrets[volumes["users"]["secret"]["secretName"]]
    assert str(config.data_root) == mounts["data"]["mountPath"] == "/data"
    assert str(config.state_dir) == mounts["state"]["mountPath"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "peftfleet-ray-token"
    # the head's in-cluster job API (KubeRay names the head Service <cluster>-head-svc)
    head = cluster()["spec"]["headGroupSpec"]["template"]
    dashboard = next(p["containerPort"] for p in containers(head)[0]["ports"] if p["name"] == "dashboard")
    assert config.ray_address == f"http://{cluster()['metadata']['name']}-head-svc.default.svc.cluster.local:" \
                                 f"{dashboard}"
    (service,) = by_kind("k8s/minio.yaml", "Service")
    assert config.storage.endpoint_url == f"http://{service['metadata']['name']}.default.svc.cluster.local:" \
                                          f"{service['spec']['ports'][0]['port']}"
    (gateway_service,) = by_kind("k8s/gateway.yaml", "Service")
    assert gateway_service["spec"]["ports"][0]["port"] == config.port and config.host == "0.0.0.0"
