"""The train stage: Ray Train workers, each driving a DeepSpeed engine (workers/train/train_loop.py); checkpoints in the
job's storage; the best by eval loss becomes the TrainResult the export reads."""

from __future__ import annotations

import logging
from pathlib import Path

from jobspecs import JobSpec
from orchestrator.stages.context import Context, CordaInit
from orchestrator.stages.waits import run_in_thread
from workers.storage.store import train_storage

log = logging.getLogger("peftfleet.train")


def preload() -> None:
    """Import what the stages will need (torch, Ray Train, the train loop) and set up this job process: seconds of
    CPU the driver spends while Ray starts."""
    from workers.runtime.job_process import start_job_process

    start_job_process()
    import ray.train.torch  # noqa: F401

    import workers.train.train_loop  # noqa: F401


def score_key(spec: JobSpec) -> str:
    """What ranks checkpoints (and trials): eval loss, or the training loss without eval data."""
    return "eval_loss" if spec.data.eval else "loss"


def trainer_args(ctx: Context, spec: JobSpec, init: CordaInit | None, run_prefix: str, label: str = "train") -> dict:
    """TorchTrainer's arguments for one training run of `spec`, its checkpoints under jobs/<run_prefix>/train/:
    a plain job's run, or one trial of a sweep (whose Tune trial adds its report callback to `run_config`)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from workers.train.train_loop import train_worker

    train = spec.train
    storage_path, filesystem = train_storage(spec.storage, run_prefix)
    return dict(
        train_loop_per_worker=train_worker,
        train_loop_config={"spec": spec, "corda_init": init and {"residual_base": init.residual_base,
                                                                  "adapter": init.adapter},
                           "label": label},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, placement_strategy=train.placement_strategy,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {}),
                                  **ctx.reserve("train", f"training worker (ZeRO-{train.zero_stage})")}),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=dict(
            name="train", storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints,
                                               checkpoint_score_attribute=score_key(spec),
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )


def read_run(result, key: str):
    """A finished (or stopped) Ray Train run's TrainResult: the best checkpoint's adapter, the latest's history."""
    from workers.train.train_loop import read_result

    best = result.get_best_checkpoint(key, "min")
    with best.as_directory() as best_dir, result.checkpoint.as_directory() as latest_dir:
        return read_result(Path(best_dir), Path(latest_dir), key)


def run_train(ctx: Context) -> None:
    """Ray Train workers, each driving a DeepSpeed engine; checkpoints in the job's storage; best by eval loss."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    spec, train = ctx.spec, ctx.spec.train
    args = trainer_args(ctx, spec, ctx.corda_init, ctx.job_id)
    trainer = TorchTrainer(**{**args, "run_config": RunConfig(**args["run_config"])})
    result = run_in_thread(trainer.fit)
    if result.error:
        raise result.error
    key = score_key(spec)
    ctx.train = out = read_run(result, key)
    if out.peak_memory_mib:
        ctx.record_peak("train", f"training worker (ZeRO-{train.zero_stage})", out.peak_memory_mib)
    last = out.metrics[-1] if out.metrics else {}
    # Logged here, not only by the workers: Ray forwards worker output asynchronously, maybe after the job ends.
    log.info("train: %d/%d steps, final loss %.4f, best step %d (%s %.4f)", last.get("step", 0), out.total_steps,
             last.get("loss", float("nan")), out.best_step, key.replace("_", " "),
             out.best_eval_loss if out.best_eval_loss is not None else float("nan"))
