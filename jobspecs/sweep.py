"""The `sweep` section: one spec, many trials (jobspecs/trials.py expands it; orchestrator/stages/sweep.py runs
it). Every swept field is named by its dotted path in the spec (`adapter.r`, `train.learning_rate`)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from jobspecs.section import Section

# Fields every trial of one job shares: where it runs, where it stores, what it is called, what it exports.
SHARED = ("name", "stages", "data_root", "storage", "cluster", "export", "sweep")

# Fields holding a local path (or s3:// URI): a relative path in a sweep is made absolute against the spec's folder
# when the spec is read, as the spec's own paths are, so the frozen spec means the same wherever it is read.
PATH_FIELDS = ("model.path", "model.tokenizer", "data.train", "data.eval", "data.calibration",
               "data.train.path", "data.eval.path", "data.calibration.path", "init.corda.covariance_from")

TIE = re.compile(r"^\s*(?:(?P<factor>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*\*\s*)?(?P<path>[a-z_][a-z0-9_.]*)\s*$")


def _path(path: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)+", path):
        raise ValueError(f"{path!r} is not a dotted spec path like adapter.r or train.learning_rate")
    if path.split(".", 1)[0] in SHARED:
        raise ValueError(f"{path}: {path.split('.', 1)[0]} is shared by every trial of a job and cannot be swept "
                         f"(sweepable: model, data, adapter, init, train)")
    return path


def _absolute(path: str, value: Any, base: Path | None) -> Any:
    if path not in PATH_FIELDS or base is None:
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return {**value, "path": _absolute(path, value["path"], base)}
    if isinstance(value, str) and not value.startswith("s3://"):
        return str((base / Path(value).expanduser()).resolve())
    return value


class Distribution(Section):
    """Exactly one of: loguniform [lo, hi], uniform [lo, hi], randint [lo, hi] (inclusive), choice [values]."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice (got {given or 'none'})")
        bounds = getattr(self, given[0])
        if given[0] == "choice":
            if not bounds:
                raise ValueError("choice: an empty list")
        elif not bounds[0] < bounds[1] or (given[0] == "loguniform" and bounds[0] <= 0):
            raise ValueError(f"{given[0]}: needs lo < hi" + (" and lo > 0" if given[0] == "loguniform" else ""))
        return self

    def draw(self, rng) -> Any:
        if self.loguniform:
            lo, hi = self.loguniform
            return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}")
        if self.uniform:
            return float(f"{rng.uniform(*self.uniform):.4g}")
        if self.randint:
            return rng.randint(*self.randint)
        return rng.choice(self.choice)


class AshaSpec(Section):
    grace_period: int = Field(2, ge=1, description="Optimizer steps every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="At each rung only the best 1/reduction_factor of the "
                                    "trials that reached it go on.")


class SweepSpec(Section):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted spec path → the values to try; "
                                       "every combination is a trial (a list-valued field takes a list of lists).")
    random: dict[str, Distribution] = Field(default_factory=dict, description="Dotted spec path → a distribution, "
                                            "drawn num_samples times per grid point (seeded by sweep.seed).")
    num_samples: int = Field(1, ge=1, description="Random draws per grid point (repeats the grid when `random` is "
                             "empty, as Ray Tune's num_samples).")
    trials: list[dict[str, Any]] = Field(default_factory=list, description="Further trials, each a mapping of "
                                         "dotted path → value, run after the grid.")
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Task name → dotted path → value "
                                             "(its data, typically): every trial runs once per task, each task "
                                             "ranks its own trials, and adapter_bundle holds each task's best, "
                                             "named for the task.")
    tie: dict[str, str] = Field(default_factory=dict, description="Dotted path → 'k * other.path' (or 'other.path'): "
                                "set from each trial's value of the other field, e.g. adapter.alpha: 2 * adapter.r.")
    seed: int = Field(0, description="Seed of the random draws (not of training: sweep train.seed for that).")
    metric: Literal["eval_loss", "loss"] = Field("eval_loss", description="What ranks trials (lower is better): the "
                                                 "best checkpoint's eval loss, or its training loss without eval data.")
    max_trials: int = Field(16, ge=1, description="The trial budget: a sweep expanding to more trials is refused.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials training at once (each asks for "
                                       "train.num_workers × train.cpus_per_worker CPUs).")
    scheduler: Literal["none", "asha"] = Field("none", description="asha: stop trials whose metric is behind at "
                                               "each rung (Ray Tune's ASHA); they keep their best checkpoint.")
    asha: AshaSpec = Field(default_factory=AshaSpec)
    bundle_trials: int | list[str] = Field(4, description="What export format adapter_bundle holds: the best N "
                                           "trials by the metric, or these trials by name.")

    @property
    def size(self) -> int:
        """How many trials the sweep expands to, from the lengths alone (nothing is built)."""
        drawn = math.prod(len(v) for v in self.grid.values()) * self.num_samples if self.grid or self.random else 0
        return max(1, len(self.tasks)) * (drawn + len(self.trials) or 1)

    def may_set(self, path: str, value: Any) -> bool:
        """Whether some trial sets `path` to `value`."""
        drawn = self.random.get(path)
        return (value in self.grid.get(path, ()) or bool(drawn and drawn.choice and value in drawn.choice)
                or any(trial.get(path) == value for trial in [*self.trials, *self.tasks.values()]))

    @field_validator("grid", "random", "tie")
    @classmethod
    def _paths(cls, value: dict) -> dict:
        for path in value:
            _path(path)
        return value

    @field_validator("grid")
    @classmethod
    def _values(cls, grid: dict) -> dict:
        for path, values in grid.items():
            if not values:
                raise ValueError(f"{path}: an empty list of values")
        return grid

    @field_validator("trials")
    @classmethod
    def _trials(cls, trials: list[dict]) -> list[dict]:
        for i, trial in enumerate(trials):
            if not trial:
                raise ValueError(f"trials[{i}]: an empty trial")
            for path in trial:
                _path(path)
        return trials

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: dict) -> dict:
        for name, values in tasks.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", name):
                raise ValueError(f"{name!r}: a task name is 1-40 chars of a-z, 0-9, '_' and '-' (it names an adapter)")
            for path in values:
                _path(path)
        return tasks

    @field_validator("grid", "trials", "tasks", mode="after")
    @classmethod
    def _paths_absolute(cls, value, info: ValidationInfo):
        base = (info.context or {}).get("base_dir")
        base = Path(base) if base is not None else None
        if info.field_name == "grid":
            return {k: [_absolute(k, v, base) for v in vs] for k, vs in value.items()}
        if info.field_name == "trials":
            return [{k: _absolute(k, v, base) for k, v in t.items()} for t in value]
        return {name: {k: _absolute(k, v, base) for k, v in t.items()} for name, t in value.items()}

    @field_validator("tie")
    @classmethod
    def _ties(cls, tie: dict) -> dict:
        for path, expr in tie.items():
            match = TIE.match(expr)
            if not match:
                raise ValueError(f"{path}: {expr!r} is not 'k * other.path' or 'other.path'")
            _path(match["path"])
            if match["path"] in tie:
                raise ValueError(f"{path}: ties to {match['path']}, itself tied")
        return tie

    @model_validator(mode="after")
    def _something(self) -> SweepSpec:
        if not (self.grid or self.random or self.trials or self.tasks):
            raise ValueError("nothing to sweep: give grid, random, trials or tasks")
        overlap = (set(self.grid) & set(self.random)) | (set(self.tie) & (set(self.grid) | set(self.random)))
        if overlap:
            raise ValueError(f"{sorted(overlap)[0]}: swept twice (grid, random and tie name distinct fields)")
        if self.size > self.max_trials:  # counted before a single trial is built: the product may be huge
            tasks = max(1, len(self.tasks))
            raise ValueError(f"{self.size} trials ({tasks} task(s) × {self.size // tasks}) exceed sweep.max_trials "
                             f"{self.max_trials}: raise the budget or sweep less")
        return self
