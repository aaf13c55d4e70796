"""The train stage of a sweep (spec.sweep): every trial on Ray Tune, each a Ray Train run of the usual train loop
(workers/train/tune_trial.py), at most sweep.max_concurrent_trials at once, optionally stopped early by ASHA.

Each trial's checkpoints are under jobs/<id>/trials/<trial>/train/ and, once it has ended, its outcome under
jobs/<id>/trials/<trial>/trial.json and its best adapter under artifacts/trials/<trial>/adapter/. A resubmitted
job keeps the trials that have an outcome (finished, or stopped early) and runs the others, which resume from
their checkpoints. The best trial by sweep.metric becomes the job's TrainResult, and the export works on it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from jobspecs import JobSpec
from jobspecs.trials import Trial, decomposition_key, expand
from orchestrator.stages.comparison import write_comparison
from orchestrator.stages.context import Context, TrialOutcome
from orchestrator.stages.corda import run_calibrate, run_decompose
from orchestrator.stages.train import read_run, trainer_args
from orchestrator.stages.waits import reason_of, run_in_thread
from orchestrator.storage.artifacts import TRIALS_BOARD, job_key
from workers.storage.store import NotInStore, train_storage

log = logging.getLogger("peftfleet.sweep")

TRIAL_DRIVER_BYTES = 256 * 2**20  # what a trial's actor (Tune's side of one Ray Train run) reserves: no CPU


class Board:
    """The sweep's trials as they stand, for `status` (jobs/<id>/trials.json): state (pending, running, finished,
    stopped, failed), the last reported step and metric, the best so far. Rewritten on every change."""

    def __init__(self, ctx: Context, trials: list[Trial], ended: dict[str, TrialOutcome]):
        self.ctx, self.metric = ctx, ctx.spec.sweep.metric
        self.rows = {t.name: {"trial": t.name, **({"task": t.task} if t.task else {}), "state": "pending",
                              "step": 0, self.metric: None, "best": None} for t in trials}
        for outcome in ended.values():
            self.ended(outcome, write=False)
        self.write()

    def update(self, name: str, **fields) -> None:
        row = self.rows[name]
        row.update(fields)
        value = fields.get(self.metric)
        if value is not None and math.isfinite(value) and (row["best"] is None or value < row["best"]):
            row["best"] = value
        self.write()

    def ended(self, outcome: TrialOutcome, write: bool = True) -> None:
        row = self.rows[outcome.name]
        row.update(state=outcome.status, step=outcome.result.get("total_steps", row["step"]),
                   best=outcome.best if outcome.usable else row["best"], reason=outcome.reason)
        if write:
            self.write()

    def write(self) -> None:
        self.ctx.store.put_bytes(job_key(self.ctx.job_id, TRIALS_BOARD), json.dumps(list(self.rows.values())).encode())


def outcome_key(job_id: str, trial: str) -> str:
    return job_key(job_id, f"trials/{trial}/trial.json")


def load_outcome(ctx: Context, trial: str) -> TrialOutcome | None:
    try:
        return TrialOutcome(**json.loads(ctx.store.get_bytes(outcome_key(ctx.job_id, trial))))
    except NotInStore:
        return None


@dataclass(frozen=True)
class Decomposition:
    """One CorDA init a sweep computes: for every trial whose init depends on the same fields."""

    name: str  # d0-r4-ipm: its folder under artifacts/corda/
    spec: JobSpec  # its first trial's
    trials: tuple[str, ...]


def trials_of(spec: JobSpec) -> list[Trial]:
    """The sweep's trials, as the stages read them: their files were checked when the driver read the frozen spec
    (a sweep over inputs in a bucket would otherwise list it again for every stage)."""
    return expand(spec, {"check_files": False})


def decompositions(spec: JobSpec) -> list[Decomposition]:
    found: dict[str, list[Trial]] = {}
    for trial in trials_of(spec):
        if (key := decomposition_key(trial.spec)) is not None:
            found.setdefault(json.dumps(key, sort_keys=True), []).append(trial)
    return [Decomposition(f"d{i}-r{group[0].spec.adapter.r}-{group[0].spec.init.corda_spec.mode}", group[0].spec,
                          tuple(t.name for t in group)) for i, group in enumerate(found.values())]


def _corda_context(ctx: Context, d: Decomposition, keep_sums: bool) -> Context:
    """A context for one decomposition: its trial's spec, publishing under artifacts/corda/<name>/, sharing the
    job's store, staging, warnings, published artifacts and memory records."""
    return replace(ctx, spec=d.spec, publish_under=f"corda/{d.name}/", keep_sums=keep_sums, corda_init=None,
                   _inputs=None, _plan=None)


def run_sweep_calibrate(ctx: Context) -> None:
    """The calibration every CorDA trial shares (validation made sure they can), once."""
    found = decompositions(ctx.spec)
    sub = _corda_context(ctx, found[0], keep_sums=len(found) > 1)
    run_calibrate(sub)
    ctx.calibration = sub.calibration


def run_sweep_decompose(ctx: Context) -> None:
    """Each distinct decomposition once, from the one calibration's sums (kept until the last)."""
    found = decompositions(ctx.spec)
    for i, d in enumerate(found):
        log.info("decompose %d/%d: %s for trial(s) %s", i + 1, len(found), d.name, ", ".join(d.trials))
        sub = _corda_context(ctx, d, keep_sums=i < len(found) - 1)
        sub.calibration = ctx.calibration
        run_decompose(sub)
        ctx.trial_inits.update(dict.fromkeys(d.trials, sub.corda_init))


def run_trials(ctx: Context) -> None:
    from workers.train.train_loop import TrainResult

    sweep = ctx.spec.sweep
    trials = trials_of(ctx.spec)
    outcomes = {t.name: o for t in trials if (o := load_outcome(ctx, t.name)) and o.status != "failed"}
    todo = [t for t in trials if t.name not in outcomes]
    log.info("sweep: %d trials (%s), %d ended in an earlier run, %d to run, %d at a time%s", len(trials),
             ", ".join(sorted({p for t in trials for p in t.values})), len(outcomes), len(todo),
             sweep.max_concurrent_trials, ", ASHA" if sweep.scheduler == "asha" else "")
    board = Board(ctx, trials, outcomes)
    if todo:
        ended = _tune(ctx, todo, outcomes, board)
        for trial in todo:  # those the callback did not record: failed ones
            if trial.name not in outcomes:
                result = ended.get(trial.name)
                outcomes[trial.name] = _record(ctx, trial, result.error if result else
                                               RuntimeError("Ray Tune returned no result for it"))
                board.ended(outcomes[trial.name])
    ranked = sorted((o for o in outcomes.values() if o.usable), key=lambda o: o.best)
    for o in outcomes.values():
        if o.status == "failed":
            ctx.warnings.append(f"sweep: trial {o.name} failed: {o.reason}")
    if not ranked:
        raise RuntimeError("sweep: no trial has a usable checkpoint: " +
                           "; ".join(f"{o.name}: {o.status} {o.reason}" for o in outcomes.values()))
    ctx.published += [folder for o in outcomes.values() if (folder := o.adapter_folder())]
    ctx.trials = ranked + [o for o in outcomes.values() if not o.usable]
    for task in sweep.tasks:  # each task ranks its own trials; the job's adapter is the first task's best
        if mine := [o for o in ranked if o.task == task]:
            log.info("sweep: task %s: best trial %s with %s %.4f", task, mine[0].name, sweep.metric, mine[0].best)
        else:
            ctx.warnings.append(f"sweep: task {task}: no trial has a usable checkpoint")
    first_task = next(iter(sweep.tasks), None)  # None without tasks: every trial's task
    best = next((o for o in ranked if o.task == first_task), ranked[0])
    by_name = {t.name: t for t in trials}
    swept = list(dict.fromkeys(p for t in trials for p in t.values))
    flags = write_comparison(ctx.artifact_dir("report"), [outcomes[t.name] for t in trials], swept,
                             [*sweep.grid, *sweep.random], sweep.metric, best.name)
    for name, why in flags.items():
        log.warning("sweep: trial %s looks like an abnormal seed: %s", name, why)
        ctx.warnings.append(f"sweep: trial {name} looks like an abnormal seed: {why}")
    log.info("sweep: best trial %s (%s) with %s %.4f; %d finished, %d stopped early, %d failed", best.name,
             ", ".join(f"{k}={v}" for k, v in best.values.items()), sweep.metric, best.best,
             *(sum(o.status == s for o in outcomes.values()) for s in ("finished", "stopped", "failed")))
    files = {f.key.rsplit("/", 1)[-1]: ctx.store.get_bytes(f.key) for f in best.adapter_folder().files}
    ctx.narrow(by_name[best.name].spec)  # the export works on what the best trial trained
    ctx.corda_init = ctx.trial_inits.get(best.name)
    ctx.train = TrainResult(adapter_files=files, **best.result)


def _tune(ctx: Context, todo: list[Trial], outcomes: dict[str, TrialOutcome], board: Board) -> dict:
    """Run the trials on Ray Tune, recording each trial's outcome as soon as it ends (a driver lost later keeps
    it); returns each trial's Tune Result by name."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from workers.train.tune_trial import run_trial

    sweep = ctx.spec.sweep
    trainers = {t.name: trainer_args(ctx, t.spec, ctx.trial_inits.get(t.name), f"{ctx.job_id}/trials/{t.name}",
                                     f"trial {t.name}") for t in todo}
    storage_path, filesystem = train_storage(ctx.spec.storage, ctx.job_id)
    callback = _callbacks(ctx, todo, outcomes, board)
    scheduler = (ASHAScheduler(time_attr="step", grace_period=sweep.asha.grace_period,
                               reduction_factor=sweep.asha.reduction_factor, max_t=10**9)
                 if sweep.scheduler == "asha" else None)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, trainers=trainers),
                            {"cpu": 0, "memory": TRIAL_DRIVER_BYTES}),
        param_space={"trial": tune.grid_search([t.name for t in todo])},
        # A reused trial actor keeps Ray Train's state from its previous trial: the next run's workers never start.
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="min", scheduler=scheduler, reuse_actors=False,
                                    max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=filesystem, verbose=0,
                                  callbacks=[callback]),
    )
    # Tune's newer console output prints where its results are even when silent; the job's log is ours alone.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    grid = run_in_thread(tuner.fit)
    release_placement_groups(list(callback.groups.values()))  # no trial runs now
    return {result.config["trial"]: result for result in grid}


def release_placement_groups(ids: list[str | None]) -> None:
    """Remove the placement groups that stopped or failed trials left behind (only ours: a shared cluster runs
    other jobs). When Tune stops a trial it kills the trial's actor, and with it Ray Train's controller, whose
    worker group's placement group outlives it (Ray Train's cleaner asks the dashboard's state API whether the
    controller lives; an embedded Ray has none): the trials after it would wait for those CPUs forever."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = ray.util.placement_group_table()
    for pg_id in ids:
        if pg_id and table.get(pg_id, {}).get("state") == "CREATED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            log.info("sweep: released the placement group %s a stopped trial left behind", pg_id[:12])


def _record(ctx: Context, trial: Trial, error: BaseException | None) -> TrialOutcome:
    """A trial's outcome from its Ray Train run in the store: its best adapter published, trial.json written."""
    from ray.train import Result
    from safetensors.torch import load as safetensors_load

    key = ctx.spec.sweep.metric
    storage_path, filesystem = train_storage(ctx.spec.storage, f"{ctx.job_id}/trials/{trial.name}")
    outcome = TrialOutcome(trial.name, trial.values, "failed", reason=reason_of(error) if error else "",
                           task=trial.task)
    if error is None:
        try:
            result = read_run(Result.from_path(f"{storage_path}/train", storage_filesystem=filesystem), key)
        except (RuntimeError, ValueError, OSError) as err:
            outcome.reason = f"no checkpoint to read: {err}"
        else:
            stopped = result.total_steps < result.planned_steps
            at = result.metrics[-1] if result.metrics else {}
            outcome.status = "stopped" if stopped else "finished"
            outcome.reason = (f"stopped by ASHA at step {result.total_steps}/{result.planned_steps}: {key} "
                              f"{at.get(key, float('nan')):.4f} was behind the rung's cut" if stopped else "")
            outcome.best = result.best_eval_loss
            outcome.result = {k: v for k, v in asdict(result).items() if k != "adapter_files"}
            with tempfile.TemporaryDirectory(prefix="peftfleet-trial-") as tmp:
                for name, data in result.adapter_files.items():
                    (Path(tmp) / name).write_bytes(data)
                folder = ctx.store.publish_folder(job_key(ctx.job_id, f"artifacts/trials/{trial.name}/adapter"),
                                                  Path(tmp))
            outcome.adapter = asdict(folder)
            outcome.params = sum(t.numel() for name, data in result.adapter_files.items()
                                 if name.endswith(".safetensors") for t in safetensors_load(data).values())
    ctx.store.put_bytes(outcome_key(ctx.job_id, trial.name), json.dumps(asdict(outcome), indent=2).encode())
    log.info("sweep: trial %s %s%s", trial.name, outcome.status,
             f" ({outcome.reason})" if outcome.reason else f", best {key} {outcome.best:.4f}")
    return outcome


def _callbacks(ctx: Context, todo: list[Trial], outcomes: dict[str, TrialOutcome], board: Board):
    """Tune's callback on the driver: our progress line per trial report (Tune's own tables are off), each ended
    trial's outcome recorded at once, and the placement groups stopped trials leave behind released."""
    callback = _callback_class()()
    callback.ctx, callback.by_name, callback.outcomes, callback.board = ctx, {t.name: t for t in todo}, outcomes, board
    callback.metric, callback.groups = ctx.spec.sweep.metric, {}  # trial → its worker group's placement group
    return callback


@functools.cache
def _callback_class() -> type:
    """Made on first use (ray.tune is imported only by sweeps). Its state lives on the instance, never in a
    closure: Tune pickles its run config (for Tuner.restore, which a sweep never uses: a resubmitted job keeps its
    trials by their outcomes), and the store's client (an S3 one holds an SSL context) cannot be pickled."""
    from ray.tune import Callback

    # Tune must never see an exception from here: what fails is recorded after Tune returns instead.
    class Trials(Callback):
        def __getstate__(self) -> dict:
            return {}

        def on_trial_start(self, iteration, trials, trial, **info):
            _quietly(self.board.update, trial.config["trial"], state="running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name, value = trial.config["trial"], result.get(self.metric, float("nan"))
            self.groups[name] = result.get("placement_group", self.groups.get(name))
            log.info("sweep: trial %s step %s %s %.4f", name, result.get("step"), self.metric, value)
            _quietly(self.board.update, name, step=result.get("step"), **{self.metric: value})

        def on_trial_complete(self, iteration, trials, trial, **info):  # finished, or stopped by the scheduler
            name = trial.config["trial"]
            _quietly(release_placement_groups, [self.groups.pop(name, None)])
            if outcome := _quietly(_record, self.ctx, self.by_name[name], None):
                self.outcomes[name] = outcome
                _quietly(self.board.ended, outcome)

        def on_trial_error(self, iteration, trials, trial, **info):
            _quietly(release_placement_groups, [self.groups.pop(trial.config["trial"], None)])

    return Trials


def _quietly(fn, *args, **kwargs):
    """fn's result, or None (logged) where it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        log.warning("sweep: %s: %s (it is retried once the trials have ended)", fn.__name__.strip("_"),
                    reason_of(err))
        return None
