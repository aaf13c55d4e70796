"""One trial of a sweep, as Ray Tune runs it: a Ray Train run of the usual train loop (workers/train/train_loop.py),
started from the trial's actor, each of its reports forwarded to Tune (which ranks trials and, with ASHA, stops
those behind). Its checkpoints live in the job's store under jobs/<id>/trials/<trial>/train/, so a resubmitted
job's trial resumes from them like any training run."""

from __future__ import annotations


def run_trial(config: dict, trainers: dict) -> None:
    """`config["trial"]` names the trial; `trainers` holds each trial's TorchTrainer arguments (its run_config as
    a dict: the report callback can only be made inside the trial)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    args = trainers[config["trial"]]
    trainer = TorchTrainer(**{**args, "run_config": RunConfig(**args["run_config"], callbacks=[TuneReportCallback()])})
    result = trainer.fit()
    if result.error:
        raise result.error
