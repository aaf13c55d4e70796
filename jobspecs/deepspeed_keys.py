"""The DeepSpeed config keys a confined job (one with a `data_root`: every gateway job) may set.

A DeepSpeed JSON is code-adjacent: DeepSpeed opens output paths named in it (`flops_profiler.output_file`, the
monitors' folders, NVMe offload's `nvme_path`) and imports modules named in it
(`torch_autocast.lower_precision_safe_modules`). So a confined job may set only the knobs below — batch sizes,
precision, ZeRO's partitioning and bucket sizes, CPU offload, activation checkpointing — and anything else is
refused, named by its dotted path. The CLI without a data root keeps the JSON verbatim: operators own their files.
"""

from __future__ import annotations

from typing import Any

_LEAF = None  # a value of any JSON type
_OFFLOAD = {"device": ("cpu", "none"), "pin_memory": _LEAF, "buffer_count": _LEAF, "buffer_size": _LEAF,
            "max_in_cpu": _LEAF, "fast_init": _LEAF, "ratio": _LEAF}

ALLOWED: dict[str, Any] = {
    **dict.fromkeys(["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "prescale_gradients",
                     "gradient_predivide_factor", "communication_data_type", "zero_allow_untested_optimizer",
                     "zero_force_ds_cpu_optimizer", "memory_breakdown", "dump_state"], _LEAF),
    "fp16": dict.fromkeys(["enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
                           "hysteresis", "consecutive_hysteresis", "min_loss_scale"], _LEAF),
    "bf16": dict.fromkeys(["enabled", "immediate_grad_update", "check_grad_overflow"], _LEAF),
    "zero_optimization": {
        **dict.fromkeys(["stage", "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
                         "reduce_bucket_size", "contiguous_gradients", "round_robin_gradients", "sub_group_size",
                         "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
                         "stage3_param_persistence_threshold", "stage3_gather_16bit_weights_on_model_save",
                         "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
                         "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters",
                         "use_multi_rank_bucket_allreduce"], _LEAF),
        "offload_optimizer": _OFFLOAD,
        "offload_param": _OFFLOAD,
    },
    "activation_checkpointing": dict.fromkeys(["partition_activations", "contiguous_memory_optimization",
                                               "cpu_checkpointing", "number_checkpoints",
                                               "synchronize_checkpoint_boundary", "profile"], _LEAF),
}


def refused(config: Any, allowed: dict[str, Any] = ALLOWED, where: str = "") -> list[str]:
    """Dotted paths of every key (or value) in `config` outside the allow-list."""
    if not isinstance(config, dict):
        return [where or "(top level: not a JSON object)"]
    out = []
    for key, value in config.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in allowed:
            out.append(path)
        elif isinstance(allowed[key], dict):
            out += refused(value, allowed[key], path)
        elif isinstance(allowed[key], tuple) and value not in allowed[key]:
            out.append(f"{path}={value!r} (one of {', '.join(map(repr, allowed[key]))})")
    return out


def refusal(paths: list[str]) -> str:
    return (f"sets {', '.join(paths)}, which a job with a data_root (every gateway job) may not: DeepSpeed opens "
            "paths and imports modules named in its config, so only batch, precision, ZeRO, CPU offload and "
            "activation checkpointing keys are accepted (jobspecs/deepspeed_keys.py)")
