"""YAML → JobSpec, with errors that name the file, the field path and the reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobspecs.schema import JobSpec, input_paths, input_problems
from jobspecs.trials import InvalidTrial, expand, shared_calibration_problem


class SpecError(Exception):
    """A spec that cannot run. `problems` are `(field path, reason)` pairs; str() is ready to print."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {path}: {reason}" if path else f"{source}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts union-member and validator-type tags in the location; users only want their own keys.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    return ".".join(parts)


_PATH_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.+)$", re.DOTALL)


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        loc = _loc(e["loc"])
        named = _PATH_PREFIX.match(msg)
        if named and named.group(1).startswith(loc):  # a cross-field rule naming its own, deeper, field path
            problems.append((named.group(1), named.group(2)))
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        problems.append((loc, msg))
    return problems


# A spec is a few hundred values; these bound the work of reading one (YAML aliases can make a 1 KB file
# stand for billions of values, and every later step walks what it holds).
MAX_VALUES = 100_000
MAX_DEPTH = 32


def _bounded(data: Any) -> str | None:
    """Why `data` is too big or too deep to be a spec (None: it is not), counted with an early stop: a value
    reached through several aliases counts each time, as every later step would see it."""
    pending, seen = [(data, 0)], 0
    while pending:
        value, depth = pending.pop()
        seen += 1
        if seen > MAX_VALUES:
            return f"more than {MAX_VALUES} values (YAML aliases expanding?): a spec is a few hundred"
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, dict):
            pending += [(v, depth + 1) for v in (*value.keys(), *value.values())]
        elif isinstance(value, list | tuple):
            pending += [(v, depth + 1) for v in value]
    return None


def parse_spec(data: Any, source: str = "<spec>", base_dir: Path | None = None, check_files: bool = True) -> JobSpec:
    """Validate an already-parsed mapping. Relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise SpecError(source, [("", f"a job spec is a YAML mapping, got {type(data).__name__}")])
    if problem := _bounded(data):
        raise SpecError(source, [("", problem)])
    base_dir = base_dir or Path.cwd()
    root = data.get("data_root")
    context = {"base_dir": base_dir, "check_files": check_files,
               "data_root": (base_dir / Path(root).expanduser()).resolve() if isinstance(root, str | Path) else None}
    try:
        spec = JobSpec.model_validate(data, context=context)
    except ValidationError as err:
        raise SpecError(source, _problems(err)) from None
    if check_files and spec.data_root is not None and (problems := input_problems(spec)):
        raise SpecError(source, problems)
    try:
        trials = expand(spec, context)  # every trial is a whole spec: checked now, before anything starts
    except InvalidTrial as err:
        raise SpecError(source, [("sweep", f"trial {err.name} ({err.shown}): {path}: {reason}")
                                 for path, reason in _problems(err.error)]) from None
    except ValueError as err:
        raise SpecError(source, [("sweep", str(err))]) from None
    if check_files and spec.data_root is not None:  # a trial's own inputs are confined like the spec's
        checked = set(input_paths(spec))
        for trial in (t for t in trials if set(input_paths(t.spec)) - checked):
            if problems := input_problems(trial.spec):
                raise SpecError(source, [("sweep", f"trial {trial.name}: {path}: {reason}")
                                         for path, reason in problems])
    if problem := shared_calibration_problem(trials):
        raise SpecError(source, [("sweep", problem)])
    named = spec.sweep.bundle_trials if spec.sweep and isinstance(spec.sweep.bundle_trials, list) else []
    if unknown := sorted(set(named) - {t.name for t in trials}):
        raise SpecError(source, [("sweep.bundle_trials", f"no trial is named {unknown[0]!r}; the trials are "
                                                         f"{', '.join(t.name for t in trials)}")])
    return spec


def load_spec(path: str | Path, check_files: bool = True) -> JobSpec:
    """Read and validate a spec file. Raises SpecError (never a bare pydantic or YAML error)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [("", "no such spec file")])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), [("", f"{where}invalid YAML: {getattr(err, 'problem', err)}")]) from None
    return parse_spec(data, source=str(path), base_dir=path.resolve().parent, check_files=check_files)


def dump_spec(spec: JobSpec) -> str:
    """The frozen form written to the store: resolved absolute paths, every default spelled out."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_from_frozen(text: str, check_files: bool = False) -> JobSpec:
    """Read back a spec written by `dump_spec` (paths already absolute)."""
    return parse_spec(yaml.safe_load(text), source="frozen spec", base_dir=Path("/"), check_files=check_files)
