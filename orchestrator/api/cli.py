"""`peftfleet`: validate, plan, submit and follow jobs; list and fetch their artifacts.

Exit codes: 0 success; 1 the job or operation failed; 2 bad input (spec, arguments, unknown job).
`submit` prints only the job id on stdout (scripts can capture it); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from jobspecs import SpecError, load_spec
from jobspecs.trials import expand
from orchestrator.control.jobs import JobError, JobRecord, JobState, LocalIndex, UnknownJob
from orchestrator.control.launchers import current_record, launcher_for
from orchestrator.control.ray_jobs import RayJobsError
from orchestrator.control.submission import cancel, follow, read_log, submit
from orchestrator.storage.artifacts import (
    IncompleteJob,
    IntegrityError,
    NoSuchKind,
    fetch_artifacts,
    job_key,
    read_manifest,
)
from workers.storage.store import StoreError

DEFAULT_STATE_DIR = Path("~/.peftfleet").expanduser()
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def _gateway(args):
    """The gateway this command talks to (`--gateway URL`), or None: the local index, a store, a Ray address."""
    if not args.gateway:
        return None
    from orchestrator.api.gateway_client import Gateway, find_token

    return Gateway(args.gateway, find_token(args.token_file))


def _files(args):
    """Where a finished job's files are read from: its store, or the gateway's presigned URLs."""
    gateway = _gateway(args)
    return gateway.files(args.job) if gateway else _index(args).get(args.job).store()


def cmd_validate(args) -> int:
    spec = load_spec(args.spec)
    out.print(f"ok: {args.spec}: job {spec.name!r}, stages {' → '.join([*spec.effective_stages, 'upload'])}, "
              f"adapter {spec.adapter.method} (init {spec.init.method}), {spec.train.num_workers} train worker(s) "
              f"ZeRO-{spec.train.zero_stage}, storage {spec.storage.uri}, "
              f"cluster {spec.cluster.address or 'embedded local Ray'}")
    if spec.sweep:
        trials = expand(spec, {"check_files": False})  # checked by load_spec already
        out.print(f"sweep: {len(trials)} trials, {spec.sweep.max_concurrent_trials} at a time, best by "
                  f"{spec.sweep.metric}: " + ", ".join(t.name for t in trials))
    return 0


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512MiB' or a plain number of bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1, "": 1}
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text.strip().lower()[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 24GiB, 80GB)") from None


def cmd_plan(args) -> int:
    from jobspecs.memory import plan

    try:  # only config.json is read: a model folder without weights (or tokenizer) can be planned
        result = plan(load_spec(args.spec, check_files=False), args.worker_memory)
    except ValueError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["model"]
    out.print(f"model: {m['params'] / 1e9:.2f}B parameters, {_gib(m['weights_bytes'])} GiB of {m['dtype']} weights "
              f"({m['layers']} blocks, hidden {m['hidden']}); the driver holds none of it")
    if "corda" in result:
        c = result["corda"]
        groups = ", ".join(f"{g} {_gib(b)} GiB" for g, b in c["covariance_bytes_per_group"].items())
        out.print(f"calibrate: strategy {c['strategy']} (asked: {c['strategy_asked']}); covariance per input group "
                  f"and block: {groups}; a replica needs {_gib(c['replica_bytes'])} GiB")
    rows = [(p["stage"], p["process"], str(p["count"]), _gib(p["total_bytes"]),
             "; ".join(f"{k} {_gib(v)}" for k, v in p["parts"].items())) for p in result["processes"]]
    print_table(("stage", "process", "count", "GiB each", "of which (GiB)"), rows)
    if "fits" in result:
        f, memory = result["fits"], _gib(args.worker_memory)
        if "replica_fits" in f:
            replica = "fits" if f["replica_fits"] else "does not fit"
            out.print(f"calibrate within {memory} GiB per actor: replica {replica}; layerwise needs "
                      f"{f['calibrate_layerwise_workers'] or 'more than 512'} worker(s)")
        for process in f["too_big"]:
            out.print(f"{process}: does not fit {memory} GiB in any worker count (one process walking the model "
                      "block by block) — the table says what it holds")
        if "train_zero3_workers" in f:
            if f["train_zero3_workers"]:
                out.print(f"train within {memory} GiB per worker: ZeRO-3 needs {f['train_zero3_workers']} worker(s)")
            else:
                out.print(f"train within {memory} GiB per worker: no worker count fits — a micro-batch's activations "
                          "do not shrink with workers; lower train.micro_batch_size or data.max_seq_len")
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def cmd_submit(args) -> int:
    if gateway := _gateway(args):
        if args.job_id or args.address:
            raise JobError("--job-id/--address: a gateway names its jobs and knows its cluster; start a job that "
                           "failed again with: peftfleet --gateway URL retry JOB", code=2)
        # The spec's paths are the gateway's (under its data root): it validates them, not this machine.
        data = yaml.safe_load(Path(args.spec).read_text())
        if not isinstance(data, dict):
            raise SpecError(args.spec, [("", "a job spec is a YAML mapping")])
        return _started(args, gateway.submit(data))
    # A Ray job reads the spec's paths on the cluster: they need not exist here (the driver checks them there).
    spec = load_spec(args.spec, check_files=args.address is None)
    return _started(args, submit(spec, _index(args), args.job_id, address=args.address))


def cmd_retry(args) -> int:
    if not (gateway := _gateway(args)):
        raise JobError("retry is for gateway jobs; here, run the job again with: peftfleet submit SPEC --job-id "
                       f"{args.job}", code=2)
    return _started(args, gateway.retry(args.job))


def _started(args, job_id: str) -> int:
    print(job_id, flush=True)
    where = f"--gateway {args.gateway} " if args.gateway else ""
    if not args.wait:
        err.print(f"submitted {job_id}; follow it with: peftfleet {where}logs {job_id} --follow")
        return 0
    gateway = _gateway(args)
    return _final(gateway.follow(job_id, sys.stderr) if gateway else follow(_index(args).get(job_id), sys.stderr))


def _final(record: JobRecord) -> int:
    style = "green" if record.state == JobState.SUCCEEDED else "red"
    detail = f" at stage {record.stage}: {record.error}" if record.error else ""
    err.print(f"[{style}]job {record.id} {record.state.value}[/{style}]{detail}")
    return 0 if record.state == JobState.SUCCEEDED else 1


def cmd_status(args) -> int:
    if gateway := _gateway(args):
        entry, record = None, gateway.record(args.job)
    else:
        entry = _index(args).get(args.job)
        record = current_record(entry)
    if args.json:
        out.print_json(json.dumps(record.to_dict()))
        return 0
    out.print(f"job {record.id}: [bold]{record.state.value}[/bold]"
              + (f" (stage {record.stage})" if record.stage else ""))
    if record.error:
        out.print(f"error: {record.error}", markup=False)
    for warning in record.warnings:
        out.print(f"warning: {warning}", markup=False)
    print_table(("stage", "state", "started", "ended", "peak memory per process (MiB, of what it reserved)"),
                [(s.name, s.state, s.started_at or "-", s.ended_at or "-", _peaks(s)) for s in record.stages])
    if record.trials:
        metric = next(k for k in record.trials[0] if k not in ("trial", "task", "state", "step", "best", "reason"))
        print_table(("trial", "state", "step", f"last {metric}", "best", "why"),
                    [(t["trial"], t["state"], str(t["step"] or "-"), _num(t[metric]), _num(t["best"]),
                      t.get("reason") or "") for t in record.trials])
        ranked = [t for t in record.trials if t["best"] is not None]
        if ranked:
            best = min(ranked, key=lambda t: t["best"])
            out.print(f"best so far: {best['trial']} ({metric} {best['best']:.4f})", markup=False)
    if entry is None:
        out.print(f"gateway: {args.gateway}")
    else:
        out.print(f"store: {entry.store().url_of(job_key(record.id))}   log: {launcher_for(entry).where()}")
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _peaks(stage) -> str:
    reserved = stage.reserved_memory_mib
    return ", ".join(f"{k} {v:,.0f}" + (f" of {reserved[k]:,.0f}" if k in reserved else "")
                     for k, v in stage.peak_memory_mib.items()) or "-"


class TrialLines:
    """A sink passing on only one sweep trial's lines: the driver's about it and its workers' progress."""

    def __init__(self, sink, trial: str):
        self.sink, self.mark, self.partial = sink, f"trial {trial}", ""

    def write(self, text: str) -> None:
        *lines, self.partial = (self.partial + text).split("\n")
        self.sink.write("".join(f"{line}\n" for line in lines if self._mine(line)))

    def _mine(self, line: str) -> bool:
        return self.mark + ":" in line or self.mark + " " in line

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        """The last line, if the log ended without a newline."""
        if self._mine(self.partial):
            self.sink.write(self.partial + "\n")
        self.partial = ""
        self.sink.flush()


def cmd_logs(args) -> int:
    gateway = _gateway(args)
    sink = sys.stdout
    if args.trial:
        record = gateway.record(args.job) if gateway else current_record(_index(args).get(args.job))
        names = [t["trial"] for t in record.trials]
        if args.trial not in names:
            raise JobError(f"--trial: job {args.job} has no trial {args.trial!r}"
                           + (f"; its trials are {', '.join(names)}" if names else " (it is not a sweep, or no "
                              "trial has started yet)"), code=2)
        sink = TrialLines(sys.stdout, args.trial)
    if gateway:
        if args.verbose:
            raise JobError("--verbose: a gateway serves the job's log only, not the libraries' output", code=2)
        if args.follow:
            gateway.follow(args.job, sink)
        else:
            sink.write(gateway.read_log(args.job)[0])
    else:
        entry = _index(args).get(args.job)
        if args.follow:
            follow(entry, sink, verbose=args.verbose)
        else:
            if entry.log and not args.verbose and not Path(entry.log).exists():
                raise JobError(f"no log for {args.job} at {entry.log}")
            sink.write(read_log(entry, verbose=args.verbose)[0])
    if isinstance(sink, TrialLines):
        sink.close()
    return 0


def cmd_cancel(args) -> int:
    gateway = _gateway(args)
    entry = None if gateway else _index(args).get(args.job)
    if (record := gateway.record(args.job) if gateway else current_record(entry)).state.terminal:
        out.print(f"job {record.id} already {record.state.value}")
        return 0
    record = gateway.cancel(args.job) if gateway else cancel(entry, args.timeout)
    out.print(f"job {record.id} {record.state.value}" + (f": {record.error}" if record.error else ""))
    return 0 if record.state == JobState.CANCELLED else 1


def cmd_artifacts(args) -> int:
    store = _files(args)
    manifest = read_manifest(store, args.job)
    print_table(("kind", "path", "bytes", "sha256"),
                [(f.kind, f.path, str(f.size), f.sha256) for f in manifest.files])
    out.print(f"manifest: {store.url_of(job_key(args.job, 'manifest.json'))} ({len(manifest.files)} files, "
              f"kinds: {', '.join(sorted(manifest.artifacts))})")
    return 0


def cmd_fetch(args) -> int:
    def progress(f, i, n):
        err.print(f"fetched {i}/{n} {f.path} ({f.size:,} bytes, sha256 ok)")

    written = fetch_artifacts(_files(args), args.job, Path(args.dest), kind=args.kind, on_file=progress)
    out.print(f"{len(written)} file(s) verified and written under {Path(args.dest).resolve()}")
    return 0


def cmd_report(args) -> int:
    dest = Path(args.dest) if args.dest else _index(args).job_dir(args.job)
    fetch_artifacts(_files(args), args.job, dest, kind="report")
    page = (dest / "report" / "index.html").resolve()
    out.print(str(page))
    if args.open:
        import webbrowser

        webbrowser.open(page.as_uri())
    return 0


def cmd_list(args) -> int:
    if gateway := _gateway(args):
        print_table(("job", "state", "stage", "created"),
                    [(r.id, r.state.value, r.stage or "-", r.created_at) for r in gateway.jobs()])
        return 0
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


def cmd_serve(args) -> int:
    from orchestrator.api.gateway import serve  # FastAPI is imported only by the gateway

    serve(args.config)
    return 0


def cmd_token(args) -> int:
    import secrets

    from orchestrator.api.gateway import hash_token

    token = secrets.token_urlsafe(32)
    print(token)
    err.print(f"give the token above to {args.user}; add this line under `users:` in the gateway's users file:\n"
              f"  {args.user}: {hash_token(token)}", markup=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftfleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where this machine remembers submitted jobs and their logs (default: %(default)s)")
    parser.add_argument("--gateway", metavar="URL",
                        help="work through a shared gateway (peftfleet serve) instead: submit, retry, status, "
                             "logs, cancel, artifacts, fetch, report and list, as a user of it. Your token comes "
                             "from PEFTFLEET_TOKEN or --token-file, never from an argument")
    parser.add_argument("--token-file", type=Path, metavar="PATH",
                        help="file holding your gateway token, readable by you alone (default: ~/.peftfleet/token)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = command("validate", cmd_validate, "check a job spec without running anything")
    p.add_argument("spec", help="job spec YAML")
    p = command("plan", cmd_plan, "memory per process and stage, from the spec and the model's config.json alone")
    p.add_argument("spec", help="job spec YAML (its model folder needs only config.json)")
    p.add_argument("--json", action="store_true", help="the plan as JSON (bytes)")
    p.add_argument("--worker-memory", type=parse_bytes, metavar="SIZE",
                   help="memory of one worker (e.g. 24GiB): also print how many workers each stage needs to fit")
    p = command("submit", cmd_submit, "start a job (embedded local Ray unless cluster.address is set)")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--address", help="run the driver as a Ray job on the cluster whose job API is here "
                                     "(http://HEAD:8265); Ray's token comes from RAY_AUTH_TOKEN or "
                                     "RAY_AUTH_TOKEN_PATH. The spec's paths are read on the cluster; its storage "
                                     "must be reachable from both sides (an S3 bucket, or a shared filesystem)")
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit 1 unless it succeeds")
    p.add_argument("--job-id", help="run under this id; the id of a failed or cancelled job (same spec) runs it "
                                    "again, resuming training from its last checkpoint")
    p = command("retry", cmd_retry, "start a gateway job that failed, was cancelled or never started again "
                                    "(its frozen spec; training resumes from its checkpoints)")
    p.add_argument("job")
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit 1 unless it succeeds")
    p = command("status", cmd_status, "a job's state, stages and error")
    p.add_argument("job")
    p.add_argument("--json", action="store_true", help="the job record as JSON")
    p = command("logs", cmd_logs, "a job's driver log (from Ray for jobs submitted with --address)")
    p.add_argument("job")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the verbose log instead: everything the libraries said (Ray, Ray Train, DeepSpeed, "
                        "transformers), interleaved with the job's log; for a Ray job, once its driver has ended")
    p.add_argument("--trial", help="a sweep's trial: only its lines (progress, outcome)")
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
    command("list", cmd_list, "jobs submitted from this machine (with --gateway: your jobs there)")
    p = command("serve", cmd_serve, "run the HTTP gateway: users submit specs with their own tokens, never Ray's")
    p.add_argument("config", type=Path, help="gateway config YAML (see orchestrator/api/gateway.py: GatewayConfig)")
    p = command("token", cmd_token, "make a gateway user token: prints it, and its users-file line on stderr")
    p.add_argument("user", help="the user's name in the gateway's users file")
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
    except (JobError, RayJobsError, IncompleteJob, IntegrityError, NoSuchKind, StoreError) as e:
        err.print(f"error: {e}", markup=False)
        return getattr(e, "code", 1)


if __name__ == "__main__":
    sys.exit(main())
