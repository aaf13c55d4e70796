"""Small helpers the tests share: writing specs beside the tiny assets and running the real CLI."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from orchestrator.jobs import process_running

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


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(state_dir: Path, *args: str, timeout: float = 300, check: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `peftfleet` in a fresh process, exactly as a user would (in `env`, default: this one's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--state-dir", str(state_dir), *map(str, args)],
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
