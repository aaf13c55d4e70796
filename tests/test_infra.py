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


# --- hardening ----------------------------------------------------------------------------------------------------


def gateway_pod() -> dict:
    (deployment,) = by_kind("k8s/gateway.yaml", "Deployment")
    return deployment["spec"]["template"]


def minio_pods() -> list[dict]:
    (deployment,) = by_kind("k8s/minio.yaml", "Deployment")
    (job,) = by_kind("k8s/minio.yaml", "Job")
    return [deployment["spec"]["template"], job["spec"]["template"]]


def test_every_pod_runs_unprivileged_on_a_read_only_root_without_a_service_account_token():
    head = cluster()["spec"]["headGroupSpec"]["template"]
    for pod in [*all_pods(), gateway_pod(), *minio_pods()]:
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        # the head keeps its token: KubeRay's autoscaler beside it scales the worker group through the API
        assert pod["spec"].get("automountServiceAccountToken") is (None if pod == head else False)
        for container in containers(pod):
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False and c["readOnlyRootFilesystem"] is True
            assert c["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
            if container["name"] != "submitter":  # writes nothing; every other container has a scratch /tmp
                assert "emptyDir" in volumes[mounts["/tmp"]], container["name"]


def test_jobs_and_the_gateway_read_the_data_volume_read_only():
    for pod in [*all_pods()[:-1], gateway_pod()]:  # the Ray pods (jobs run there) and the gateway
        (container,) = containers(pod)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
        assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True


def _labels() -> dict[str, dict]:
    """Every pod kind's labels, as the manifests (or, for Ray pods, KubeRay) set them."""
    name = cluster()["metadata"]["name"]
    (job,) = by_kind("k8s/rayjob.yaml", "RayJob")
    minio, setup = minio_pods()
    return {"ray head": {"ray.io/cluster": name, "ray.io/node-type": "head"},
            "ray worker": {"ray.io/cluster": name, "ray.io/node-type": "worker"},
            "gateway": gateway_pod()["metadata"]["labels"], "minio": minio["metadata"]["labels"],
            "minio setup": setup["metadata"]["labels"],
            "submitter": job["spec"]["submitterPodTemplate"]["metadata"]["labels"],
            "another pod": {"app": "anything-else"}}


def _allowed(source: str, dest: str, port: int, namespace: str = "default") -> bool:
    """Whether the NetworkPolicies let a pod of kind `source` (or, for "ingress", a pod of the ingress
    controller's namespace) reach `port` on a pod of kind `dest`."""
    labels = _labels()
    src = {} if source == "ingress" else labels[source]
    src_ns = {"kubernetes.io/metadata.name": "ingress-nginx" if source == "ingress" else namespace}

    def matches(selector: dict, have: dict) -> bool:
        return all(have.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for policy in by_kind("k8s/network-policy.yaml", "NetworkPolicy"):
        spec = policy["spec"]
        if not matches(spec["podSelector"], labels[dest]):
            continue
        for rule in spec.get("ingress", []):
            peers = rule.get("from", [])
            ports = [p["port"] for p in rule.get("ports", [])]
            peer_ok = any(("podSelector" in p and source != "ingress" and matches(p["podSelector"], src)) or
                          ("namespaceSelector" in p and "podSelector" not in p and matches(p["namespaceSelector"],
                                                                                            src_ns))
                          for p in peers)
            if peer_ok and (not ports or port in ports):
                return True
    return False


def test_network_policies_allow_each_flow_and_nothing_else():
    (deny,) = [p for p in by_kind("k8s/network-policy.yaml", "NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    allowed = [("ray worker", "ray head", 6379), ("ray head", "ray worker", 10_002), ("ray worker", "ray head", 10001),
               ("gateway", "ray head", 8265), ("submitter", "ray head", 8265),
               ("ray head", "minio", 9000), ("ray worker", "minio", 9000), ("gateway", "minio", 9000),
               ("minio setup", "minio", 9000), ("ingress", "gateway", 8000)]
    refused = [("gateway", "ray head", 6379), ("gateway", "ray head", 10001), ("another pod", "ray head", 8265),
               ("another pod", "ray head", 6379), ("another pod", "minio", 9000), ("submitter", "minio", 9000),
               ("another pod", "gateway", 8000), ("ray head", "gateway", 8000), ("gateway", "ray worker", 6379),
               ("ingress", "ray head", 8265), ("ingress", "minio", 9000)]
    assert [f for f in allowed if not _allowed(*f)] == []
    assert [f for f in refused if _allowed(*f)] == []


def test_the_bucket_is_reached_with_a_least_privilege_user_and_the_root_stays_with_minio():
    root_refs = {name for name in ("k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/gateway.yaml", "k8s/minio.yaml")
                 if "peftfleet-minio-root" in (INFRA / name).read_text()}
    assert root_refs == {"k8s/minio.yaml"}
    minio, setup = minio_pods()
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in containers(minio)[0]["env"]}
    assert env == {"MINIO_ROOT_USER": "peftfleet-minio-root", "MINIO_ROOT_PASSWORD": "peftfleet-minio-root"}
    script = " ".join(containers(setup)[0]["args"])
    assert 'admin user add store "$AWS_ACCESS_KEY_ID"' in script
    assert 'admin policy attach store peftfleet-rw --user "$AWS_ACCESS_KEY_ID"' in script
    (policy_map,) = by_kind("k8s/minio.yaml", "ConfigMap")
    import json

    statements = json.loads(policy_map["data"]["peftfleet-rw.json"])["Statement"]
    resources = {r for s in statements for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::peftfleet", "arn:aws:s3:::peftfleet/*"}
    assert all(s["Effect"] == "Allow" and not any(a in ("s3:*", "*") or a.startswith("admin:") for a in s["Action"])
               for s in statements)
    # the gateway's store is that bucket
    (configmap,) = by_kind("k8s/gateway.yaml", "ConfigMap")
    config = GatewayConfig.model_validate(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    assert config.storage.uri.startswith("s3://peftfleet/")


def test_the_gateway_rolls_out_on_its_volume_and_hands_out_public_https_urls():
    (deployment,) = by_kind("k8s/gateway.yaml", "Deployment")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    rwo = {c["metadata"]["name"] for c in by_kind("k8s/gateway.yaml", "PersistentVolumeClaim")
           if c["spec"]["accessModes"] == ["ReadWriteOnce"]}
    assert claims & rwo and deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (configmap,) = by_kind("k8s/gateway.yaml", "ConfigMap")
    config = GatewayConfig.model_validate(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    assert config.storage.public_endpoint_url.startswith("https://")
    assert config.storage.endpoint_url.startswith("http://minio.")  # in-cluster, for the gateway's own calls
