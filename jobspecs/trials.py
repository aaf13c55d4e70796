"""A sweep's trials: the spec's `sweep` section expanded into named trials, each a whole JobSpec validated as one.

Trial i's spec is the job's spec (without its sweep) with the trial's values set at their dotted paths, then its
ties; it is validated exactly as a submitted spec would be, so a bad value fails before anything starts, naming
the trial and the field.
"""

from __future__ import annotations

import copy
import itertools
import random
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from jobspecs.schema import JobSpec
from jobspecs.sweep import TIE, SweepSpec

# A swept field under these reads files (paths, or a model's tensors for BitFit's targets): its trials are checked
# against them; the rest of a trial only re-runs the schema's rules.
_READS_FILES = ("model.", "data.", "init.corda.covariance_from", "adapter.method", "adapter.target_modules")


class InvalidTrial(Exception):
    """A trial whose spec does not validate; `error` is pydantic's, with field paths from the spec's root."""

    def __init__(self, name: str, values: dict[str, Any], error: ValidationError):
        self.name, self.values, self.error = name, values, error
        super().__init__(f"trial {name} ({self.shown})")

    @property
    def shown(self) -> str:
        return ", ".join(f"{k}={_label(v)}" for k, v in self.values.items())


@dataclass(frozen=True)
class Trial:
    name: str  # t00-r4-lr0p003: a folder name in the store and an adapter name in the bundle
    values: dict[str, Any]  # dotted path → value (swept, then tied; not the task's)
    spec: JobSpec
    task: str | None = None  # sweep.tasks: the task it trains for


def points(sweep: SweepSpec) -> list[tuple[str | None, dict[str, Any]]]:
    """(task, values) of each trial, in order: per task (or once), the grid × num_samples random draws, then the
    explicit trials."""
    rng = random.Random(sweep.seed)
    drawn = []
    if sweep.grid or sweep.random:
        grid = [dict(zip(sweep.grid, combo, strict=True)) for combo in itertools.product(*sweep.grid.values())]
        drawn = [{**point, **{path: dist.draw(rng) for path, dist in sweep.random.items()}}
                 for _ in range(sweep.num_samples) for point in grid]
    each = drawn + [dict(trial) for trial in sweep.trials] or [{}]  # tasks alone: one trial each
    return [(task, dict(point)) for task in (sweep.tasks or [None]) for point in each]


def _get(raw: dict, path: str) -> Any:
    value: Any = raw
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _set(raw: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        if not isinstance(raw.get(key), dict):
            raw[key] = {}
        raw = raw[key]
    raw[leaf] = value


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(map(_label, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


# Short names where a field's leaf is long or its value says what it is.
_SHORT = {"learning_rate": "lr", "target_modules": "", "method": "", "mode": "", "num_virtual_tokens": "vt"}


def trial_name(i: int, values: dict[str, Any], swept: list[str], task: str | None = None) -> str:
    """t<i>[-<task>]-<leaf><value>-... (t01-r4-lr0p01): readable in `status`, safe as a folder and as a peft adapter
    name."""
    parts = [task or "", *(f"{_SHORT.get(leaf := path.rsplit('.', 1)[-1], leaf)}{_label(values[path])}"
                           for path in swept if path in values)]
    parts = [p for p in parts if p]
    # no dots: peft refuses them in adapter names (0.01 → 0p01)
    name = re.sub(r"[^A-Za-z0-9_+-]+", "", "-".join([f"t{i:02d}", *parts]).replace(".", "p"))
    return name[:60]


def expand(spec: JobSpec, context: dict | None = None) -> list[Trial]:
    """The sweep's trials as whole specs. Raises InvalidTrial for the first trial that does not validate, and
    ValueError for a tie to a field that is not a number."""
    sweep = spec.sweep
    if sweep is None:
        return []
    values = points(sweep)  # at most sweep.max_trials: SweepSpec refuses more from the lengths alone
    base = spec.model_dump(mode="json", exclude={"sweep"})
    # a trial's adapter, not the job's exports: the bundle is made of trials
    base["export"]["formats"] = [f for f in base["export"]["formats"] if f != "adapter_bundle"]
    swept = list(dict.fromkeys([*sweep.grid, *sweep.random, *(p for t in sweep.trials for p in t)]))
    context = dict(context or {})
    trials = []
    for i, (task, point) in enumerate(values):
        raw = copy.deepcopy(base)
        for path, value in {**(sweep.tasks[task] if task else {}), **point}.items():
            _set(raw, path, value)
        tied = {}
        for path, expr in sweep.tie.items():
            match = TIE.match(expr)
            source = _get(raw, match["path"])
            if not isinstance(source, int | float):
                raise ValueError(f"tie: {path} ties to {match['path']}, which is {source!r} in trial {i}, "
                                 "not a number")
            value = source * float(match["factor"] or 1)
            tied[path] = int(value) if isinstance(source, int) and value.is_integer() else value
            _set(raw, path, tied[path])
        name = trial_name(i, point, swept, task)
        reads = any(path.startswith(_READS_FILES) for path in [*point, *(sweep.tasks[task] if task else ())])
        try:
            trial_spec = JobSpec.model_validate(
                raw, context={**context, "check_files": context.get("check_files", True) and reads})
        except ValidationError as err:
            raise InvalidTrial(name, {**point, **tied}, err) from None
        trials.append(Trial(name=name, values={**point, **tied}, spec=trial_spec, task=task))
    return trials


# What a CorDA init depends on beyond its calibration: the decomposition's own fields.
_DECOMPOSITION_ONLY = {"mode", "damping", "fidelity_tolerance"}


def decomposition_key(spec: JobSpec) -> dict | None:
    """Everything CorDA's init of this spec depends on (None: not CorDA). Trials with equal keys share one
    decomposition; the key without the decomposition's own fields is the calibration's."""
    if spec.init.method != "corda":
        return None
    return {"model": spec.model.model_dump(mode="json"),
            "data": spec.data.model_dump(mode="json", exclude={"train", "eval", "streaming"}),
            "adapter": spec.adapter.model_dump(mode="json", exclude={"dropout"}),
            "corda": spec.init.corda_spec.model_dump(mode="json")}


def calibration_key(spec: JobSpec) -> dict | None:
    key = decomposition_key(spec)
    if key is None:
        return None
    corda = {k: v for k, v in key["corda"].items() if k not in _DECOMPOSITION_ONLY}
    return {"model": key["model"], "data": key["data"], "target_modules": key["adapter"]["target_modules"],
            "corda": corda}


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {prefix: raw}
    return {k: v for key, value in raw.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def shared_calibration_problem(trials: list[Trial]) -> str | None:
    """A sweep collects CorDA's covariance once: why its CorDA trials cannot share one calibration, if so."""
    keyed = [(t, key) for t in trials if (key := calibration_key(t.spec)) is not None]
    for trial, key in keyed[1:]:
        first, first_key = keyed[0]
        if key != first_key:
            a, b = _flat(first_key), _flat(key)
            field = next(k for k in a | b if a.get(k) != b.get(k))
            return (f"trials {first.name} and {trial.name} calibrate CorDA differently ({field} differs): a sweep "
                    "collects the covariance once for all its trials; sweep what changes the calibration in separate "
                    "jobs (they can share one covariance through init.corda.save_covariance and covariance_from)")
    return None
