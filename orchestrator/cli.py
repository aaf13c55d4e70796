"""`peftfleet`: validate, submit and follow jobs; list and fetch their artifacts.

Exit codes: 0 success; 1 the job or operation failed; 2 bad input (spec, arguments, unknown job).
`submit` prints only the job id on stdout (scripts can capture it); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from jobspecs import JobSpec, SpecError, dump_spec, load_spec
from orchestrator.artifacts import IncompleteJob, IntegrityError, fetch_artifacts, job_key, read_manifest
from orchestrator.jobs import (
    JOB_ID,
    IndexEntry,
    JobRecord,
    JobState,
    LocalIndex,
    UnknownJob,
    current_record,
    new_job_id,
    new_record,
)
from orchestrator.store import StoreError, open_store

DEFAULT_STATE_DIR = Path("~/.peftfleet").expanduser()
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table on a terminal; tab-separated lines when piped, so scripts get whole values."""
    if out.is_terminal:
        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        for row in [headers, *rows]:
            print("\t".join(row))


def _index(args) -> LocalIndex:
    return LocalIndex(args.state_dir)


def cmd_validate(args) -> int:
    spec = load_spec(args.spec)
    out.print(f"ok: {args.spec}: job {spec.name!r}, stages {' → '.join([*spec.effective_stages, 'upload'])}, "
              f"adapter {spec.adapter.method} (init {spec.init.method}), {spec.train.num_workers} train worker(s) "
              f"ZeRO-{spec.train.zero_stage}, storage {spec.storage.uri}, "
              f"cluster {spec.cluster.address or 'embedded local Ray'}")
    return 0


def differences(a, b, path: str = "") -> list[str]:
    """Dotted paths where two frozen specs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)]
    return [] if a == b else [path]


def prepare_resubmission(spec: JobSpec, job_id: str, store, index: LocalIndex) -> JobRecord | None:
    """The record of an earlier attempt of `job_id` if it may be resumed (None: a new job with this id).
    Checkpoints live in the job's storage, so a new driver continues training where the last one stopped."""
    if not JOB_ID.fullmatch(job_id):
        raise CliError(f"--job-id {job_id!r}: use 1-80 characters of a-z, 0-9, '.', '_' and '-'", code=2)
    if not store.exists(job_key(job_id, "job.json")):
        return None
    try:
        previous = current_record(index.get(job_id))  # notices a local driver that died mid-job
    except UnknownJob:
        previous = JobRecord.load(store, job_id)
    if previous.state == JobState.SUCCEEDED:
        raise CliError(f"job {job_id} already SUCCEEDED; fetch its artifacts with: peftfleet fetch {job_id} DEST",
                       code=2)
    if not previous.state.terminal:
        raise CliError(f"job {job_id} is {previous.state.value} (driver {previous.driver or 'not started'}); "
                       f"cancel it first, or wait for it", code=2)
    frozen = yaml.safe_load(store.get_bytes(job_key(job_id, "spec.yaml")))
    changed = differences(frozen, yaml.safe_load(dump_spec(spec)))
    if changed:
        raise CliError(f"job {job_id} was submitted with a different spec (differs at: {', '.join(changed)}); "
                       f"resuming needs the same spec, or submit without --job-id for a new job", code=2)
    return previous


def submit(spec: JobSpec, index: LocalIndex, job_id: str | None = None) -> str:
    """Freeze the spec and record into the store, start the driver, and return the job id. With the id of a job
    that failed, was cancelled or lost its driver, the job runs again and training resumes from its checkpoints."""
    store = open_store(spec.storage)
    try:
        previous = prepare_resubmission(spec, job_id, store, index) if job_id else None
        job_id = job_id or new_job_id(spec.name)
        record = new_record(job_id, spec)
        if previous:
            record.created_at, record.attempts = previous.created_at, previous.attempts + 1
        store.put_bytes(job_key(job_id, "spec.yaml"), dump_spec(spec).encode())
        record.save(store)
    except StoreError as e:
        raise CliError(f"cannot write the job to {spec.storage.uri}: {e}") from None
    job_dir = index.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    log_path = job_dir / "driver.log"
    storage_json = spec.storage.model_dump_json()
    with open(log_path, "ab") as log:
        if previous:
            log.write(f"--- attempt {record.attempts} (resubmitted) ---\n".encode())
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.driver", job_id, storage_json],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    index.add(IndexEntry(job_id=job_id, storage=json.loads(storage_json), log=str(log_path), pid=proc.pid))
    return job_id


def cmd_submit(args) -> int:
    spec = load_spec(args.spec)
    job_id = submit(spec, _index(args), args.job_id)
    print(job_id, flush=True)
    if not args.wait:
        err.print(f"submitted {job_id}; follow it with: peftfleet logs {job_id} --follow")
        return 0
    record = follow(_index(args).get(job_id), sys.stderr)
    return _final(record)


def _final(record: JobRecord) -> int:
    style = "green" if record.state == JobState.SUCCEEDED else "red"
    detail = f" at stage {record.stage}: {record.error}" if record.error else ""
    err.print(f"[{style}]job {record.id} {record.state.value}[/{style}]{detail}")
    return 0 if record.state == JobState.SUCCEEDED else 1


def follow(entry: IndexEntry, sink, poll_s: float = 0.5) -> JobRecord:
    """Stream the job's log into `sink` until the job reaches a final state; returns the final record."""
    log_path = Path(entry.log)
    position, last_check = 0, 0.0
    record = current_record(entry)
    while True:
        if log_path.exists():
            with open(log_path, "rb") as f:
                f.seek(position)
                chunk = f.read()
                position += len(chunk)
            if chunk:
                sink.write(chunk.decode(errors="replace"))
                sink.flush()
        if record.state.terminal:
            return record
        if time.monotonic() - last_check > 1.0:
            record, last_check = current_record(entry), time.monotonic()
            continue  # read the log once more before returning on a final state
        time.sleep(poll_s)


def cmd_status(args) -> int:
    entry = _index(args).get(args.job)
    record = current_record(entry)
    if args.json:
        out.print_json(json.dumps({**record.__dict__, "state": record.state.value,
                                   "stages": [s.__dict__ for s in record.stages]}))
        return 0
    out.print(f"job {record.id}: [bold]{record.state.value}[/bold]"
              + (f" (stage {record.stage})" if record.stage else ""))
    if record.error:
        out.print(f"error: {record.error}", markup=False)
    for warning in record.warnings:
        out.print(f"warning: {warning}", markup=False)
    print_table(("stage", "state", "started", "ended"),
                [(s.name, s.state, s.started_at or "-", s.ended_at or "-") for s in record.stages])
    out.print(f"store: {entry.store().url_of(job_key(record.id))}   log: {entry.log}")
    return 0


def cmd_logs(args) -> int:
    entry = _index(args).get(args.job)
    if args.follow:
        follow(entry, sys.stdout)
        return 0
    log_path = Path(entry.log)
    if not log_path.exists():
        raise CliError(f"no log for {args.job} at {log_path}")
    sys.stdout.write(log_path.read_text(errors="replace"))
    return 0


def cmd_cancel(args) -> int:
    entry = _index(args).get(args.job)
    record = current_record(entry)
    if record.state.terminal:
        out.print(f"job {record.id} already {record.state.value}")
        return 0
    if not entry.driver_alive():
        raise CliError(f"job {record.id}: its driver (pid {entry.pid}) is not running on this machine")
    os.kill(entry.pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and entry.driver_alive():
        time.sleep(0.2)
    forced = entry.driver_alive()
    if forced:  # it did not wind down in time: take its whole session (embedded Ray included) down
        os.killpg(entry.pid, signal.SIGKILL)
    store = entry.store()
    record = JobRecord.load(store, entry.job_id)
    if not record.state.terminal:  # the driver died before it could record the cancel: record it for it
        how = f" (driver killed after {args.timeout:.0f}s)" if forced else ""
        record.finish(JobState.CANCELLED, f"cancelled during stage {record.stage}{how}")
        record.save(store)
    out.print(f"job {record.id} {record.state.value}" + (f": {record.error}" if record.error else ""))
    return 0 if record.state == JobState.CANCELLED else 1


def cmd_artifacts(args) -> int:
    entry = _index(args).get(args.job)
    store = entry.store()
    manifest = read_manifest(store, args.job)
    print_table(("kind", "path", "bytes", "sha256"),
                [(f.kind, f.path, str(f.size), f.sha256) for f in manifest.files])
    out.print(f"manifest: {store.url_of(job_key(args.job, 'manifest.json'))} ({len(manifest.files)} files, "
              f"kinds: {', '.join(sorted(manifest.artifacts))})")
    return 0


def cmd_fetch(args) -> int:
    entry = _index(args).get(args.job)

    def progress(f, i, n):
        err.print(f"fetched {i}/{n} {f.path} ({f.size:,} bytes, sha256 ok)")

    written = fetch_artifacts(entry.store(), args.job, Path(args.dest), kind=args.kind, on_file=progress)
    out.print(f"{len(written)} file(s) verified and written under {Path(args.dest).resolve()}")
    return 0


def cmd_report(args) -> int:
    index = _index(args)
    entry = index.get(args.job)
    dest = Path(args.dest) if args.dest else index.job_dir(args.job)
    fetch_artifacts(entry.store(), args.job, dest, kind="report")
    page = (dest / "report" / "index.html").resolve()
    out.print(str(page))
    if args.open:
        import webbrowser

        webbrowser.open(page.as_uri())
    return 0


def cmd_list(args) -> int:
    index = _index(args)
    rows = []
    for job_id in index.ids():
        try:
            record = current_record(index.get(job_id))
            rows.append((job_id, record.state.value, record.stage or "-", record.created_at))
        except (UnknownJob, StoreError) as e:
            rows.append((job_id, "?", "-", str(e)))
    print_table(("job", "state", "stage", "created"), rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftfleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where this machine remembers submitted jobs and their logs (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = command("validate", cmd_validate, "check a job spec without running anything")
    p.add_argument("spec", help="job spec YAML")
    p = command("submit", cmd_submit, "start a job (embedded local Ray unless cluster.address is set)")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit 1 unless it succeeds")
    p.add_argument("--job-id", help="run under this id; the id of a failed or cancelled job (same spec) runs it "
                                    "again, resuming training from its last checkpoint")
    p = command("status", cmd_status, "a job's state, stages and error")
    p.add_argument("job")
    p.add_argument("--json", action="store_true", help="the job record as JSON")
    p = command("logs", cmd_logs, "a job's driver log")
    p.add_argument("job")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p = command("cancel", cmd_cancel, "stop a running job; it ends CANCELLED")
    p.add_argument("job")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a clean stop (default: 30)")
    p = command("artifacts", cmd_artifacts, "list a finished job's artifacts from its manifest")
    p.add_argument("job")
    p = command("fetch", cmd_fetch, "download a job's artifacts, verifying every sha256")
    p.add_argument("job")
    p.add_argument("dest", help="destination folder")
    p.add_argument("--kind", help="only this artifact kind (e.g. adapter)")
    p = command("report", cmd_report, "fetch a finished job's report (verified) and print the path of its page")
    p.add_argument("job")
    p.add_argument("--dest", help="folder to fetch into (default: the job's folder under --state-dir)")
    p.add_argument("--open", action="store_true", help="also open the page in a browser")
    command("list", cmd_list, "jobs submitted from this machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        err.print(str(e), markup=False)
        return 2
    except UnknownJob as e:
        err.print(f"error: {e}", markup=False)
        return 2
    except (CliError, IncompleteJob, IntegrityError, StoreError, KeyError) as e:
        err.print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", markup=False)
        return getattr(e, "code", 1)


if __name__ == "__main__":
    sys.exit(main())
