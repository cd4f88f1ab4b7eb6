#!/usr/bin/env python3
"""A Kiln command line on the `kiln_client` package (python/kiln-client), as an example of it.

  python kiln_client.py submit MODEL [--input name=value ...] [--file name=path ...]
                        [--param k=v ...] [--label k=v ...] [--priority N]
                        [--idempotency-key K] [--max-attempts N] [--out DIR]
  python kiln_client.py watch JOB_ID [--out DIR]
  python kiln_client.py status JOB_ID
  python kiln_client.py cancel JOB_ID
  python kiln_client.py jobs [--status S] [--model M] [--dead-letter] [--limit N]
  python kiln_client.py ping
  python kiln_client.py models
  python kiln_client.py cluster

Global options (before the subcommand): --nats URL (default $KILN_NATS_URL or
nats://127.0.0.1:4222), --prefix P (default kiln), --timeout S (request timeout, default 10).

`submit` uploads each --file, submits the job, follows its events to the end, downloads every
artifact (sha256 checked) and prints one final JSON line (`watch` does the same for an
existing job): {"job_id": "..", "status": "completed", "files": ["kiln-results/<job_id>/image.png", ...]}

Values of --input, --param and --label are parsed as JSON when they parse (steps=20 is a
number) and kept as strings otherwise (prompt=a cat); quote to force a string: 'prompt="42"'.

Exit status: 0 the job completed (or the request succeeded); 1 it ended failed or cancelled;
2 Kiln answered with an error, or cannot be reached; 3 an artifact could not be downloaded.

Install the package with `pip install ./python/kiln-client`; run from a checkout, this script
also finds it beside itself.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# This script shares the package's name: take its own folder off the path, or
# `import kiln_client` would import the script itself.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
try:
    import kiln_client
except ImportError:  # a checkout without the package installed: use its source
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "kiln-client" / "src"))
    import kiln_client


def pairs(values, what, parse=True):
    out = {}
    for pair in values or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} {pair!r}: expected name=value")
        try:
            out[key] = json.loads(value) if parse else value
        except ValueError:
            out[key] = value
    return out


def describe(event):
    """One readable line per event."""
    line = time.strftime("%H:%M:%S", time.localtime(event.ts_ms / 1000))
    if event.attempt:
        line += f" [attempt {event.attempt}]"
    if event.type == "status":
        line += f" status {event.status}"
    elif event.type == "progress":
        progress = f" {event.progress:.0f}%" if event.progress is not None else ""
        line += f" {event.stage or 'progress'}{progress} {event.message or ''}".rstrip()
    elif event.type == "artifact" and event.artifact:
        line += f" artifact {event.artifact['name']} ({event.artifact['size']} bytes, {event.artifact['content_type']})"
    else:
        line += f" {event.message or ''}"
    if event.error:
        line += f" [{event.error['code']}: {event.error['message']}]"
    return line


def follow_and_fetch(kiln, job_id, out):
    """Follows a job to its end, downloads its artifacts, prints the final JSON line."""
    view = kiln.wait(job_id, on_event=lambda e: print(describe(e), flush=True))
    final = {"job_id": job_id, "status": view["status"], "files": []}
    code = 0 if view["status"] == "completed" else 1
    try:
        final["files"] = [str(p) for p in kiln.download(view, out or "kiln-results", per_job=out is None, overwrite=out is not None)]
    except (kiln_client.KilnError, OSError) as e:
        print(f"cannot download the artifacts: {e}", file=sys.stderr)
        code = 3
    if view.get("error"):
        final["error"] = view["error"]
        print(f"job {view['status']}: {view['error']['code']}: {view['error']['message']}", file=sys.stderr)
    print(json.dumps(final), flush=True)
    return code


def command(kiln, args):
    if args.command == "submit":
        files = pairs(args.file, "--file", parse=False)
        reply = kiln.submit(
            args.model,
            pairs(args.input, "--input"),
            pairs(args.param, "--param"),
            files=files,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            max_attempts=args.max_attempts,
            labels={k: str(v) for k, v in pairs(args.label, "--label", parse=False).items()} or None,
        )
        print(json.dumps(reply), flush=True)
        return follow_and_fetch(kiln, reply["job_id"], args.out)
    if args.command == "watch":
        return follow_and_fetch(kiln, args.job_id, args.out)
    if args.command in ("status", "cancel"):
        print(json.dumps(getattr(kiln, args.command)(args.job_id), indent=2))
    elif args.command == "jobs":
        jobs = kiln.jobs(status=args.status, model=args.model, dead_letter=args.dead_letter or None, limit=args.limit)
        for job in jobs["jobs"]:
            error = job.get("error")
            print(
                f"{job['job_id']}  {job['model']:<16} {job['status']:<10} attempt {job['attempt']}/{job['max_attempts']}"
                + (f"  {error['code']}: {error['message']}" if error else "")
            )
    elif args.command == "ping":
        instances = kiln.ping(args.wait)
        for i in instances:
            print(f"{i.get('name')} {i.get('version')} id={i.get('id')} metadata={json.dumps(i.get('metadata') or {})}")
        if not instances:
            print(f"no instance of service {kiln.prefix}-api answered within {args.wait} s", file=sys.stderr)
            return 2
        print(f"{len(instances)} instance(s) of {kiln.prefix}-api")
    else:
        print(json.dumps(kiln.models() if args.command == "models" else kiln.cluster(), indent=2))
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description="A Kiln client (the kiln_client package).")
    p.add_argument("--nats", default=os.environ.get("KILN_NATS_URL", "nats://127.0.0.1:4222"), help="NATS URL")
    p.add_argument("--prefix", default="kiln", help="Kiln's subject/bucket prefix (default kiln)")
    p.add_argument("--timeout", type=float, default=10.0, help="request timeout in seconds")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a job, follow it, download its results")
    s.add_argument("model")
    s.add_argument("--input", action="append", metavar="NAME=VALUE", help="an inline input (repeatable)")
    s.add_argument("--file", action="append", metavar="NAME=PATH", help="a file input, uploaded first (repeatable)")
    s.add_argument("--param", action="append", metavar="K=V", help="a model parameter (repeatable)")
    s.add_argument("--label", action="append", metavar="K=V", help="a label of the job (repeatable)")
    s.add_argument("--priority", type=int, metavar="N", help="0-255; above 0 runs before normal jobs")
    s.add_argument("--idempotency-key", metavar="K", help="same key and model: the same job")
    s.add_argument("--max-attempts", type=int, metavar="N", help="at most the model's max_attempts")
    s.add_argument("--out", metavar="DIR", help="where to write the artifacts (default ./kiln-results/<job_id>)")
    w = sub.add_parser("watch", help="replay and follow an existing job, then download its results")
    w.add_argument("job_id")
    w.add_argument("--out", metavar="DIR", help="where to write the artifacts (default ./kiln-results/<job_id>)")
    for name, text in (("status", "show a job"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    ping = sub.add_parser("ping", help="list the instances of the Kiln API service ($SRV.PING)")
    ping.add_argument("--wait", type=float, default=1.0, help="seconds to collect replies")
    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument("--status", choices=["queued", "running", "retrying", "completed", "failed", "cancelled"])
    j.add_argument("--model")
    j.add_argument("--dead-letter", action="store_true", help="only jobs that failed after their last attempt")
    j.add_argument("--limit", type=int, help="at most this many (default 100, at most 1000)")
    sub.add_parser("models", help="list the configured models")
    sub.add_parser("cluster", help="show the nodes and GPU slots")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with kiln_client.Client(args.nats, prefix=args.prefix, timeout=args.timeout) as kiln:
            return command(kiln, args)
    except kiln_client.KilnError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
