#!/usr/bin/env python3
"""A Kiln client in plain Python: nats-py (2.16) and the standard library, nothing else.

Copy it, or read it as a worked example of docs/PROTOCOL.md.

  python kiln_client.py submit MODEL [--input name=value ...] [--file name=path ...]
                        [--param k=v ...] [--priority N] [--idempotency-key K]
                        [--max-attempts N] [--out DIR]
  python kiln_client.py watch JOB_ID [--out DIR]
  python kiln_client.py status JOB_ID
  python kiln_client.py cancel JOB_ID
  python kiln_client.py jobs [--status S] [--model M] [--dead-letter] [--limit N]
  python kiln_client.py ping
  python kiln_client.py models
  python kiln_client.py cluster

Global options (before the subcommand): --nats URL (default $KILN_NATS_URL or
nats://127.0.0.1:4222), --prefix P (default kiln), --timeout S (request timeout, default 10).

`submit` uploads each --file to the files bucket, submits the job, prints the reply, follows the
job's events until it ends (replaying the history first, so it never misses one), fetches the
result, downloads every artifact, checks its sha256, and prints one final JSON line
(`watch` does the same for a job submitted earlier, from anywhere):
  {"job_id": "..", "status": "completed", "files": ["kiln-results/<job_id>/image.png", ...]}

Values of --input and --param are parsed as JSON when they parse (steps=20 is a number,
loras='["a","b"]' a list) and kept as strings otherwise (prompt=a cat). To pass a string
that looks like JSON, quote it: --input 'prompt="42"'.

Exit status: 0 the job completed (or the request succeeded); 1 the job ended failed or
cancelled; 2 Kiln answered with an error, or Kiln/NATS cannot be reached; 3 an artifact could
not be downloaded or failed its sha256 check.
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
import uuid

import nats
import nats.js.errors
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError
from nats.js.api import DeliverPolicy

TERMINAL = {"completed", "failed", "cancelled"}
# If no event arrives for this long while following, ask the status endpoint whether the job
# ended anyway (its events may have expired, or a terminal event was never stored).
FOLLOW_POLL_S = 5.0


class KilnError(Exception):
    """An error reply from Kiln: {"error": {"code": .., "message": ..}}."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """A thin wrapper: one NATS connection, the subject and bucket names of one prefix."""

    def __init__(self, nc, prefix, timeout):
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.timeout = timeout

    @property
    def events_stream(self):
        # KILN_EVENTS for the default prefix (see core/src/nats/names.rs).
        return prefix_upper(self.prefix) + "_EVENTS"

    async def request(self, endpoint, body):
        """Requests `<prefix>.api.<endpoint>` with a JSON body; returns the decoded reply or
        raises KilnError for an error reply."""
        subject = f"{self.prefix}.api.{endpoint}"
        try:
            msg = await self.nc.request(subject, json.dumps(body).encode(), timeout=self.timeout)
        except NoRespondersError:
            raise KilnError("no_responders", f"no Kiln node answers on {subject}; is a node running?") from None
        except NatsTimeoutError:
            raise KilnError("timeout", f"no reply on {subject} within {self.timeout} s") from None
        try:
            reply = json.loads(msg.data) if msg.data else None
        except ValueError:
            reply = None
        # The error envelope is an object whose only key is "error". (A job view or a result
        # may carry an "error" too, next to "job_id": that is the job's error, not the reply's.)
        if isinstance(reply, dict) and set(reply) == {"error"} and isinstance(reply["error"], dict):
            err = reply["error"]
            raise KilnError(err.get("code", "unknown"), err.get("message", ""))
        if reply is None:
            # A NATS service framework error (headers only), or something that is not Kiln.
            headers = msg.headers or {}
            if "Nats-Service-Error" in headers:
                raise KilnError(headers.get("Nats-Service-Error-Code", "unknown"), headers["Nats-Service-Error"])
            raise KilnError("bad_reply", f"reply on {subject} is not JSON: {msg.data[:200]!r}")
        return reply

    async def upload(self, path):
        """Uploads a local file to `<prefix>_files` as `uploads/<uuid>/<basename>` and returns
        the object name, to be passed as {"object": name}. The bucket's TTL (24 h by default)
        removes it later; Kiln never needs it after the job ran."""
        name = f"uploads/{uuid.uuid4()}/{safe_object_segment(os.path.basename(path))}"
        with open(path, "rb") as f:
            data = f.read()
        store = await self.js.object_store(f"{self.prefix}_files")
        await store.put(name, data)
        return name

    async def follow(self, job_id, on_event):
        """Replays then follows `<prefix>.events.<job_id>` with an ordered consumer that starts
        at the first stored event, until a terminal status event. Returns the final status."""
        subject = f"{self.prefix}.events.{job_id}"
        sub = await self.js.subscribe(
            subject,
            stream=self.events_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=FOLLOW_POLL_S)
                except NatsTimeoutError:
                    # Quiet for a while: a long step, a job waiting in the queue, or a job that
                    # ended without (or before the history of) a terminal event. Ask.
                    view = await self.request("status", {"job_id": job_id})
                    if view.get("status") in TERMINAL:
                        return view["status"]
                    continue
                try:
                    event = json.loads(msg.data)
                except ValueError:
                    continue
                on_event(event)
                if event.get("type") == "status" and event.get("status") in TERMINAL:
                    return event["status"]
        finally:
            await sub.unsubscribe()

    async def download(self, artifact, dest):
        """Downloads one artifact from its bucket, checks its sha256, writes it to `dest`."""
        store = await self.js.object_store(artifact["bucket"])
        result = await store.get(artifact["object"])
        data = result.data or b""
        got = hashlib.sha256(data).hexdigest()
        if got != artifact["sha256"]:
            raise ValueError(f"sha256 of {artifact['object']} is {got}, Kiln recorded {artifact['sha256']}")
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        tmp = dest + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)


def prefix_upper(prefix):
    return prefix.upper().replace("-", "_")


def safe_object_segment(name):
    """Object names allow letters, digits, '-', '_', '.' (core/src/ids.rs); keep the file
    name readable and replace anything else."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "file"
    return cleaned[:128]


def parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(pairs, what):
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} {pair!r}: expected name=value")
        out[key] = value
    return out


def describe(event):
    """One readable line per event."""
    ts = time.strftime("%H:%M:%S", time.localtime(event.get("ts_ms", 0) / 1000))
    kind = event.get("type")
    attempt = event.get("attempt", 0)
    head = f"{ts} [attempt {attempt}]" if attempt else f"{ts}"
    if kind == "status":
        line = f"{head} status {event.get('status')}"
    elif kind == "progress":
        parts = [event.get("stage") or "progress"]
        if event.get("progress") is not None:
            parts.append(f"{event['progress']:.0f}%")
        if event.get("message"):
            parts.append(event["message"])
        line = f"{head} " + " ".join(parts)
    elif kind == "artifact" and event.get("artifact"):
        a = event["artifact"]
        line = f"{head} artifact {a.get('name')} ({a.get('size')} bytes, {a.get('content_type')})"
    else:
        line = f"{head} {event.get('message', '')}"
    if event.get("error"):
        line += f" [{event['error'].get('code')}: {event['error'].get('message')}]"
    return line


def safe_file_name(name):
    base = os.path.basename(name)
    if base in ("", ".", ".."):
        raise ValueError(f"artifact name {name!r} is not a file name")
    return base


async def cmd_submit(client, args):
    inputs = {k: parse_value(v) for k, v in parse_pairs(args.input, "--input").items()}
    for key, path in parse_pairs(args.file, "--file").items():
        name = await client.upload(path)
        print(f"uploaded {path} as {name}", flush=True)
        inputs[key] = {"object": name}
    request = {
        "model": args.model,
        "inputs": inputs,
        "params": {k: parse_value(v) for k, v in parse_pairs(args.param, "--param").items()},
        "priority": args.priority,
    }
    if args.idempotency_key:
        request["idempotency_key"] = args.idempotency_key
    if args.max_attempts is not None:
        request["max_attempts"] = args.max_attempts

    reply = await client.request("submit", request)
    print(json.dumps(reply), flush=True)
    return await follow_and_fetch(client, reply["job_id"], args.out)


async def follow_and_fetch(client, job_id, out):
    """Follows a job to its end, downloads its artifacts, prints the final JSON line."""
    await client.follow(job_id, lambda e: print(describe(e), flush=True))
    result = await client.request("result", {"job_id": job_id})
    status = result.get("status")
    out_dir = out or os.path.join("kiln-results", job_id)
    files = []
    failed_download = False
    for artifact in result.get("artifacts", []):
        try:
            dest = os.path.join(out_dir, safe_file_name(artifact["name"]))
            await client.download(artifact, dest)
            files.append(dest)
        except Exception as e:
            print(f"cannot download {artifact.get('name')}: {e}", file=sys.stderr)
            failed_download = True
    final = {"job_id": job_id, "status": status, "files": files}
    if result.get("error"):
        final["error"] = result["error"]
        print(f"job {status}: {result['error'].get('code')}: {result['error'].get('message')}", file=sys.stderr)
    print(json.dumps(final), flush=True)
    if failed_download:
        return 3
    return 0 if status == "completed" else 1


async def cmd_job(client, endpoint, job_id):
    print(json.dumps(await client.request(endpoint, {"job_id": job_id}), indent=2))
    return 0


async def cmd_jobs(client, args):
    request = {"dead_letter": args.dead_letter}
    if args.status:
        request["status"] = args.status
    if args.model:
        request["model"] = args.model
    if args.limit is not None:
        request["limit"] = args.limit
    reply = await client.request("jobs", request)
    for job in reply.get("jobs", []):
        error = job.get("error") or {}
        print(
            f"{job['job_id']}  {job['model']:<16} {job['status']:<10} attempt {job['attempt']}/{job['max_attempts']}"
            + (f"  {error.get('code')}: {error.get('message')}" if error else "")
        )
    return 0


async def cmd_plain(client, endpoint):
    print(json.dumps(await client.request(endpoint, {}), indent=2))
    return 0


async def cmd_ping(client, wait_s):
    """`$SRV.PING.<service>` is answered by every instance of the service (one per node), so
    collect replies for a moment instead of taking the first."""
    service = f"{client.prefix}-api"
    inbox = client.nc.new_inbox()
    sub = await client.nc.subscribe(inbox)
    await client.nc.publish(f"$SRV.PING.{service}", b"", reply=inbox)
    instances = []
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        try:
            msg = await sub.next_msg(timeout=left)
        except NatsTimeoutError:
            break
        try:
            instances.append(json.loads(msg.data))
        except ValueError:
            continue
    await sub.unsubscribe()
    for i in instances:
        print(f"{i.get('name')} {i.get('version')} id={i.get('id')} metadata={json.dumps(i.get('metadata') or {})}")
    if not instances:
        print(f"no instance of service {service} answered within {wait_s} s", file=sys.stderr)
        return 2
    print(f"{len(instances)} instance(s) of {service}")
    return 0


def priority(text):
    value = int(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 255")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description="A Kiln client (nats-py).")
    p.add_argument("--nats", default=os.environ.get("KILN_NATS_URL", "nats://127.0.0.1:4222"), help="NATS URL")
    p.add_argument("--prefix", default="kiln", help="Kiln's subject/bucket prefix (default kiln)")
    p.add_argument("--timeout", type=float, default=10.0, help="request timeout in seconds")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a job, follow it, download its results")
    s.add_argument("model")
    s.add_argument("--input", action="append", metavar="NAME=VALUE", help="an inline input (repeatable)")
    s.add_argument("--file", action="append", metavar="NAME=PATH", help="a file input, uploaded first (repeatable)")
    s.add_argument("--param", action="append", metavar="K=V", help="a model parameter (repeatable)")
    s.add_argument("--priority", type=priority, default=0, metavar="N", help="0-255; above 0 runs before normal jobs")
    s.add_argument("--idempotency-key", metavar="K", help="same key and model: the same job")
    s.add_argument("--max-attempts", type=int, metavar="N", help="at most the model's max_attempts")
    s.add_argument("--out", metavar="DIR", help="where to write the artifacts (default ./kiln-results/<job_id>)")

    w = sub.add_parser("watch", help="replay and follow an existing job, then download its results")
    w.add_argument("job_id")
    w.add_argument("--out", metavar="DIR", help="where to write the artifacts (default ./kiln-results/<job_id>)")
    for name, text in (("status", "show a job"), ("cancel", "cancel a job")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job_id")
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


async def run(args):
    connected = False

    async def on_error(e):
        # nats-py's default prints a traceback for every failed connect attempt; once
        # connected, one line per asynchronous error (a slow consumer, a lost link) is enough.
        if connected:
            print(f"nats: {e!r}", file=sys.stderr)

    try:
        nc = await nats.connect(
            args.nats,
            name="kiln-python-client",
            connect_timeout=args.timeout,
            max_reconnect_attempts=3,
            error_cb=on_error,
        )
        connected = True
    except Exception as e:
        print(f"cannot connect to {args.nats}: {e}", file=sys.stderr)
        return 2
    client = Client(nc, args.prefix, args.timeout)
    try:
        if args.command == "submit":
            return await cmd_submit(client, args)
        if args.command == "watch":
            return await follow_and_fetch(client, args.job_id, args.out)
        if args.command in ("status", "cancel"):
            return await cmd_job(client, args.command, args.job_id)
        if args.command == "jobs":
            return await cmd_jobs(client, args)
        if args.command == "ping":
            return await cmd_ping(client, args.wait)
        return await cmd_plain(client, args.command)
    except KilnError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        return 2
    except (OSError, nats.errors.Error, nats.js.errors.Error) as e:
        print(f"error: {e!r}", file=sys.stderr)
        return 2
    finally:
        await nc.drain()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
