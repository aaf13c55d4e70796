"""A base model loaded for ZeRO-3 without any process reading all of it: built inside DeepSpeed's partitioned init
(transformers' `from_config` enters `deepspeed.zero.Init` while an `HfDeepSpeedConfig` is alive), then each rank
reads only its own slice of every parameter from the safetensors files, with positional reads.

`from_pretrained` under ZeRO-3 instead has rank 0 memory-map every checkpoint file and scatter each module from
there, so rank 0's resident memory grows by about the model's size while it loads. Here every rank reads
≈ model ÷ world bytes, and nothing is memory-mapped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.storage.weights import read_range, tensor_infos


def partitioned_model(folder: str | Path, dtype: torch.dtype):
    """The causal LM in `folder`, partitioned by ZeRO-3 as it is built, each rank's slices read from the files."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("partitioned_model needs an HfDeepSpeedConfig of ZeRO-3 alive (see train_loop.setup)")
    # from_config initialises the weights on rank 0 only (overwritten below): keep that off the random stream, or
    # the adapter created next would be initialised differently on rank 0 than on the others
    with torch.random.fork_rng():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    load_partitions(model, Path(folder))
    return model


@torch.no_grad()
def load_partitions(model: torch.nn.Module, folder: Path) -> None:
    """Fill each ZeRO-3 parameter's local partition (`ds_tensor`: elements [rank·size, rank·size + size) of the
    flattened tensor, the last one short) from `folder`'s safetensors; buffers saved in the checkpoint whole."""
    import deepspeed.comm as dist

    infos = tensor_infos(folder)
    missing = [name for name, _ in model.named_parameters() if name not in infos]
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no tensor for {len(missing)} of the model's parameters "
                         f"({', '.join(missing[:3])}...)")
    for name, param in model.named_parameters():
        info, part = infos[name], param.ds_tensor
        if tuple(param.ds_shape) != info.shape:
            raise ValueError(f"{folder}: {name} has shape {info.shape}, the model's config says "
                             f"{tuple(param.ds_shape)}")
        start = part.ds_numel * dist.get_rank(group=param.ds_process_group)
        count = max(0, min(part.ds_numel, info.numel - start))
        if count:
            part.narrow(0, 0, count).copy_(read_range(folder, info, start, count))
    for name, buffer in model.named_buffers():
        if name in infos:
            buffer.copy_(read_range(folder, infos[name], 0, infos[name].numel).view(buffer.shape))
