"""The adapter_bundle export of a sweep: several trials' adapters in one folder, each a sub-folder named for its
trial, that stock peft loads as named adapters on one base:

    model = PeftModel.from_pretrained(base, "adapter_bundle/t03-r8-lr0p01", adapter_name="t03-r8-lr0p01")
    model.load_adapter("adapter_bundle/t01-r4-lr0p01", adapter_name="t01-r4-lr0p01")
    model.set_adapter("t01-r4-lr0p01")

A CorDA trial's adapter lives on its own residual base, so it enters the bundle re-expressed on the original base
(workers/adapter_math.to_original_base): every member applies to the one model the README names.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from jobspecs.schema import JobSpec
from workers.methods import adapter_math
from workers.runtime.job_process import start_job_process
from workers.storage.node_cache import local_folder
from workers.storage.store import StoredFolder, open_store


def write_bundle(spec: JobSpec, members: list[dict], metric: str, prefix: str) -> StoredFolder:
    """`members`: per adapter its name (the trial's, or its task's), trial, values, metric, adapter (a StoredFolder)
    and CorDA init (or None), best first; the bundle is written to `prefix` in the job's store."""
    start_job_process()
    base = str(spec.model.path)
    with tempfile.TemporaryDirectory(prefix="peftfleet-bundle-") as tmp:
        out = Path(tmp)
        for member in members:
            trained = local_folder(spec, member["adapter"])
            if member["corda_init"] is not None:
                adapter_math.to_original_base(trained, local_folder(spec, member["corda_init"]), base,
                                              out / member["name"])
            else:
                shutil.copytree(trained, out / member["name"])
                config = out / member["name"] / adapter_math.ADAPTER_CONFIG
                if config.exists():  # the base a user loads it on: the model the spec names
                    config.write_text(json.dumps({**json.loads(config.read_text()),
                                                  "base_model_name_or_path": base}, indent=2))
        (out / "README.md").write_text(readme(spec, members, metric))
        return open_store(spec.storage).publish_folder(prefix, out)


def readme(spec: JobSpec, members: list[dict], metric: str) -> str:
    first = members[0]["name"]
    note = "CorDA: converted to the original base"
    rows = "\n".join(f"| `{m['name']}` | {m['trial']} | {', '.join(f'{k}={v}' for k, v in m['values'].items())} | "
                     f"{m['best']:.4f} | {m['status']} | {note if m['corda_init'] else ''} |" for m in members)
    load = "\n".join(f'model.load_adapter("adapter_bundle/{m["name"]}", adapter_name="{m["name"]}")'
                     for m in members[1:])
    return f"""# adapter bundle

{len(members)} adapters of one sweep, best first by {metric}, all on the base model `{spec.model.path}`.

| adapter | trial | values | best {metric} | status | note |
|---|---|---|---|---|---|
{rows}

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{spec.model.path}")
model = PeftModel.from_pretrained(base, "adapter_bundle/{first}", adapter_name="{first}")
{load}
model.set_adapter("{first}")  # switch with set_adapter(name)
```
"""
