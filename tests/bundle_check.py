"""Run in a fresh interpreter (`python -m tests.bundle_check JSON`): load an adapter_bundle with stock peft as
named adapters on one base, switch with set_adapter, and compare each adapter's logits with the same trial loaded
on its own (its base and adapter folder, given per name). Prints the largest difference per adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(spec: dict) -> None:
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    bundle, names = Path(spec["bundle"]), list(spec["members"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), bundle / names[0],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(bundle / name, adapter_name=name)
    gaps, outs = {}, {}
    with torch.no_grad():
        for name, (single_base, single_adapter) in spec["members"].items():
            model.set_adapter(name)
            outs[name] = model(input_ids=ids).logits
            alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(single_base), single_adapter)
            gaps[name] = float((outs[name] - alone(input_ids=ids).logits).abs().max())
    distinct = all(not torch.equal(outs[a], outs[b]) for a in names for b in names if a < b)
    print(json.dumps({"active": model.active_adapter, "gaps": gaps, "distinct": distinct}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
