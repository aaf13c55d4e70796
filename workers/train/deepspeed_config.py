"""The DeepSpeed config a train worker initialises with: generated from the spec, or the user's JSON (verbatim;
for a job with a data_root, only its allow-listed keys: jobspecs/deepspeed_keys.py).

The optimizer is always the client's `torch.optim.AdamW` (`zero_allow_untested_optimizer`): DeepSpeed's own
"AdamW" picks FusedAdam and CPU offload picks DeepSpeedCPUAdam, both compiled with g++/nvcc on first use
(≈40 s and ≈5.6 GB on CPU machines), and adapters have too few parameters for a fused kernel to matter.
"""

from __future__ import annotations

from jobspecs.schema import JobSpec, confined_deepspeed_config


def deepspeed_config(spec: JobSpec, world_size: int) -> dict:
    train = spec.train
    if train.deepspeed_config is not None:
        config = confined_deepspeed_config(spec)  # read here again: the file may have changed since validation
        config.setdefault("zero_allow_untested_optimizer", True)
        return config
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero.update(zero3_limits(spec))
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep torch AdamW under optimizer offload too (no compile)
        "steps_per_print": 2**31 - 1,  # our own progress lines say more
        "wall_clock_breakdown": False,
    }


def zero3_limits(spec: JobSpec) -> dict:
    """Bound what ZeRO-3 keeps gathered to about two decoder blocks. DeepSpeed's defaults (1e9 live parameters,
    reuse distance 1e9) keep every gathered block until the step ends: on a model under 1e9 parameters each
    worker ends up holding the whole model, which is what partitioning was for."""
    from jobspecs.memory import Shape

    shape = Shape.from_config(spec.model.path)
    return {"stage3_max_live_parameters": 2 * shape.block_params, "stage3_max_reuse_distance": 2 * shape.block_params,
            "stage3_prefetch_bucket_size": shape.block_params, "stage3_param_persistence_threshold": 10 * shape.hidden}
