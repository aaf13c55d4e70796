"""Small helpers the tests share: writing specs beside the tiny assets and running the real CLI."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.control.launchers import process_running

EXAMPLES = Path(__file__).resolve().parents[1] / "jobspecs" / "examples"


def tiny_spec(assets: Path, store: str, **sections) -> dict:
    """The demo example's spec, pointed at `assets` and `store`, with sections merged in (one level deep)."""
    spec = yaml.safe_load((EXAMPLES / "tiny-lora.yaml").read_text())
    spec["model"]["path"] = str(assets / "tiny-llama")
    spec["data"]["train"] = str(assets / "train.jsonl")
    spec["data"]["eval"] = str(assets / "eval.jsonl")
    spec["storage"] = {"uri": store}
    spec["train"]["log_every"] = 1
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(name), dict):
            spec[name] = {**copy.deepcopy(spec[name]), **value}
        else:
            spec[name] = value
    return spec


def weights_only(assets: Path, folder: Path) -> Path:
    """The tiny model's folder without its tokenizer files."""
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(assets / "tiny-llama" / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MiB = 1024 * 1024


def make_staging(root, big_mib: int = 0):
    """A staging tree like the export stage leaves: <kind>/<files>, optionally one large file."""
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (root / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (root / "report").mkdir()
    (root / "report" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if big_mib:
        (root / "residual_base").mkdir()
        (root / "residual_base" / "model.safetensors").write_bytes(os.urandom(big_mib * MiB + 12345))
    return root


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(state_dir: Path, *args: str, timeout: float = 300, check: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `peftfleet` in a fresh process, exactly as a user would (in `env`, default: this one's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.api.cli", "--state-dir", str(state_dir), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"peftfleet {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def wait_gone(pid: int, timeout: float = 60) -> bool:
    """Wait for `pid` to exit: a process whose raylet died notices it only on its next poll."""
    deadline = time.monotonic() + timeout
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not process_running(pid)


@dataclass(frozen=True)
class Proc:
    pid: int
    parent: int
    started: int  # clock ticks after boot
    cmdline: bytes


def cmdline(pid: int) -> bytes:
    """A process's command line (Ray puts its process title there); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def ray_processes(title: str) -> list[Proc]:
    """Live processes whose Ray process title (their cmdline) starts with `title`, newest first. Ray may keep
    processes of an earlier worker group around, titled alike; the live group's are the most recently started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            line = cmdline(int(entry))
            if line.startswith(title.encode()):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                found.append(Proc(int(entry), int(fields[1]), int(fields[19]), line))
        except (OSError, ValueError, IndexError):  # gone while being read
            pass
    return sorted(found, key=lambda proc: proc.started, reverse=True)


def upload_folder(client, bucket: str, prefix: str, folder: Path) -> None:
    """Every file under `folder` as an object under `prefix` (a model or dataset kept in a bucket)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
