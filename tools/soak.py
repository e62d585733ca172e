"""``make soak``: several flespi streams against the whole pipeline, SQS faults on.

What ``make run`` assembles, assembled here with one addition: a
fault-injecting SQS (``tools.faulty_sqs``) between the app and the embedded
moto SQS, so the app's SendMessageBatch calls are throttled, answered 500,
reset before or after SQS stored them, and have entries fail. The consumer
(the local SQS trigger, ``tools.sqs_trigger``) reads moto directly and posts
to an ``http`` sink: a loopback receiver run here, which itself answers 500
or hangs past the sink's timeout some of the time.

Each simulated stream behaves like flespi (``tools.simulate``): one request
at a time, the same batch resent until it gets a 200. Every message carries
a ``soak.id`` (stream and sequence number), so at the end the report can say
exactly which messages were sent, acked (a 200 covered them), delivered to
the sink (how often), left in the dead-letter queue, or lost: acked but
neither delivered nor in the DLQ. Exit status 1 if any acked message was
lost or is still queued after the drain; 0 otherwise.

Loopback only; stops by itself after ``--duration`` seconds of streaming
plus at most ``--drain-timeout`` seconds for the consumer to empty the queue.
The app's own log lines (one per request and per batch) go to a file, named
in the report, so the terminal shows progress and the result.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator

import boto3
import orjson
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError
from chalice.app import Chalice
from chalice.config import Config
from chalice.local import CustomLocalChalice

from tools import local_run, simulate, sqs_trigger
from tools.faulty_sqs import FaultCounts, FaultPlan, FaultySqs

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: The key each soak message carries: "<stream>-<sequence>".
ID_KEY = "soak.id"


# --------------------------------------------------------------------------- the sink


@dataclass
class SinkCounts:
    """What the receiver saw; ``delivered`` counts each message id per 2xx-bound POST."""

    posts: int = 0
    rejected: int = 0  # answered 500: not delivered
    hung: int = 0  # received, then answered too late for the sink's timeout
    delivered: Counter = field(default_factory=Counter)


class SinkReceiver:
    """A loopback HTTP endpoint for the ``http`` sink that misbehaves on purpose.

    A POST it answers 500 (probability ``fail``) counts as not delivered. A
    POST it hangs on (the first ``hang_first`` POSTs, then probability
    ``hang``) has arrived - its messages are counted delivered - but the
    answer comes after ``hang_seconds``, past the consumer's deadline, so the
    consumer must treat it as failed and SQS redelivers it: a duplicate, the
    at-least-once price.
    """

    def __init__(self, fail: float = 0.0, hang: float = 0.0, hang_seconds: float = 0.0,
                 hang_first: int = 0, seed: int | None = None, key: str = ID_KEY) -> None:
        self.counts = SinkCounts()
        self.fail, self.hang, self.hang_seconds, self.hang_first = fail, hang, hang_seconds, hang_first
        self.key = key
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}/sink"

    def __enter__(self) -> "SinkReceiver":
        threading.Thread(target=self._server.serve_forever, name="sink", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def delivered_ids(self) -> set[str]:
        with self._lock:
            return set(self.counts.delivered)

    def _decide(self, messages: list[dict]) -> str:
        """Draw this POST's fate and book it, under one lock."""
        with self._lock:
            self.counts.posts += 1
            if self._random.random() < self.fail:
                self.counts.rejected += 1
                return "fail"
            self.counts.delivered.update(str(m.get(self.key)) for m in messages)
            if self.counts.posts <= self.hang_first or self._random.random() < self.hang:
                self.counts.hung += 1
                return "hang"
            return "ok"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fate = receiver._decide(orjson.loads(body))
                if fate == "hang":
                    time.sleep(receiver.hang_seconds)
                try:
                    self.send_response(500 if fate == "fail" else 200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a hung answer: the sink stopped waiting, as intended

        return Handler


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    """``make run``'s pieces (from ``tools.local_run``) around an already loaded app.

    The caller decides where the app's SQS calls go (``AWS_ENDPOINT_URL``,
    read when the app makes its sender) - the soak and the reliability tests
    point it at the fault-injecting proxy - while provisioning and the local
    trigger use ``sqs``, a client on the real (moto) SQS.
    """

    app: Chalice
    config: Config
    sqs: Any
    queue_name: str
    api_key: str = "soak-key"
    visibility_timeout: int = 2
    max_receive_count: int = 5
    consumers: int = 1
    #: The consumer Lambda's timeout in seconds; None keeps the project's.
    consume_timeout: int | None = None
    #: Records per consumer invocation; None keeps the decorator's.
    consume_batch_size: int | None = None
    dlq_name: str = ""
    _http: Any = None
    _pollers: list[sqs_trigger.SqsPoller] = field(default_factory=list)

    def __enter__(self) -> "Pipeline":
        self.dlq_name = local_run.provision(self.sqs, self.queue_name, self.max_receive_count,
                                            self.visibility_timeout)
        options = local_run.Options(
            project_dir=ROOT, stage="dev", port=0, sqs_port=0, api_key=self.api_key,
            max_receive_count=self.max_receive_count, visibility_timeout=self.visibility_timeout,
        )
        _undo_local_class(self.app)
        self._http = local_run.build_http_server(self.app, self.config, options)
        threading.Thread(target=self._http.server.serve_forever, name="http", daemon=True).start()
        for source in sqs_trigger.discover(self.app, self.config):
            source = replace(source, queue_name=self.queue_name,
                             timeout_seconds=self.consume_timeout or source.timeout_seconds,
                             batch_size=self.consume_batch_size or source.batch_size)
            for _ in range(self.consumers):
                poller = sqs_trigger.SqsPoller(source, self.sqs, local_run.POLL_SECONDS)
                poller.start()
                self._pollers.append(poller)
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server.server_close()
        self.stop_consumers()

    def stop_consumers(self) -> None:
        for poller in self._pollers:
            poller.stop(local_run.STOP_GRACE_SECONDS)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._http.server.server_address[1]}/flespi"

    def queue_url(self, name: str | None = None) -> str:
        return self.sqs.get_queue_url(QueueName=name or self.queue_name)["QueueUrl"]

    def queued(self, name: str | None = None) -> int:
        """Messages in a queue, visible or in flight."""
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url(name),
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return sum(int(value) for value in attributes.values())

    def wait_drained(self, timeout: float) -> bool:
        """Until the consumer has emptied the queue (twice in a row), or ``timeout``."""
        deadline = time.monotonic() + timeout
        empty_checks = 0
        while time.monotonic() < deadline:
            try:
                empty_checks = empty_checks + 1 if self.queued() == 0 else 0
            except BotoCoreError:  # a busy moto answers slowly; ask again
                empty_checks = 0
            if empty_checks == 2:
                return True
            time.sleep(0.5)
        return False


def _undo_local_class(app: Chalice) -> None:
    """Chalice's ``create_local_server`` re-parents the app's class in place and
    fails on an app it already changed; undo it so one process (the tests)
    can build several pipelines on the same app."""
    if type(app) is CustomLocalChalice:
        app.__class__ = CustomLocalChalice.__bases__[1]


def take_all(sqs: Any, queue_url: str) -> list[dict]:
    """Receive and delete every message of a (stopped) queue: what is left in it."""
    taken: list[dict] = []
    while batch := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                       VisibilityTimeout=600).get("Messages", []):
        taken.extend(batch)
        sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)])
    return taken


def message_ids(bodies: Iterable[str], key: str = ID_KEY) -> list[str]:
    """The ids carried by SQS bodies (one message or a packed array), in order."""
    ids: list[str] = []
    for body in bodies:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue  # a poison record carries no id
        for message in value if isinstance(value, list) else [value]:
            if isinstance(message, dict) and key in message:
                ids.append(str(message[key]))
    return ids


# --------------------------------------------------------------------------- the streams


@dataclass
class StreamRun:
    """One simulated flespi stream: every message it offered, in order, and its stats."""

    number: int
    offered: list[str] = field(default_factory=list)
    stats: simulate.Stats = field(default_factory=simulate.Stats)
    error: BaseException | None = None

    def acked_ids(self) -> list[str]:
        """flespi sends batches in order and a 200 acks one whole batch, so the
        acked messages are exactly the first ``stats.acked`` offered."""
        return self.offered[: self.stats.acked]

    def stamp(self, batches: Iterator[list[dict]]) -> Iterator[list[dict]]:
        """Give each message of the stream a unique ``soak.id`` as it is offered."""
        for batch in batches:
            for message in batch:
                message[ID_KEY] = f"{self.number}-{len(self.offered)}"
                self.offered.append(message[ID_KEY])
            yield batch


@dataclass(frozen=True)
class StreamSettings:
    """How the simulated streams behave (flespi's stream settings)."""

    streams: int = 4
    batch: int = 100
    devices: int = 10
    rate: float = 0.0  # messages per second per stream; 0: as fast as answers come
    count: int = 0  # messages per stream; 0: until the duration is over
    duration: float = 60.0
    backoff: float = 0.2
    max_backoff: float = 2.0
    timeout: float = 30.0
    seed: int = 1


def run_streams(url: str, api_key: str, settings: StreamSettings) -> list[StreamRun]:
    """Run the streams side by side (one thread each) until each is done."""
    samples = json.loads(simulate.SAMPLES.read_text())
    headers = {"Content-Type": "application/json", "x-api-key": api_key}
    stream = simulate.Stream(url, headers, settings.timeout, settings.backoff, settings.max_backoff)
    runs = [StreamRun(number) for number in range(settings.streams)]

    def one(run: StreamRun) -> None:
        rng = random.Random(settings.seed * 1000 + run.number)
        devices = simulate.fleet(samples, settings.devices, rng)
        source = run.stamp(simulate.batches(devices, settings.batch, rng))
        try:
            simulate.run(stream, source, settings.count, settings.rate, settings.duration,
                         run.stats, simulate.Progress(run.stats, io.StringIO()))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            run.error = exc

    threads = [threading.Thread(target=one, args=(run,), name=f"stream-{run.number}")
               for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for run in runs:
        if run.error is not None:
            raise run.error
    return runs


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """The soak's outcome in counts; ``lost`` must be 0."""

    streams: int
    seconds: float
    requests: int
    resent_requests: int
    sent: int  # distinct messages sent at least once
    acked: int  # distinct messages a 200 covered
    delivered: int  # distinct acked messages the sink received
    deliveries: int  # messages the sink received, repeats included
    duplicated: int  # deliveries beyond the first, per message
    delivered_unacked: int  # sent, never acked (503 or the end), yet delivered
    in_dlq: int
    still_queued: int
    lost: int  # acked, neither delivered nor in the DLQ
    drained: bool
    answers: dict[str, int]
    sqs_faults: dict[str, int]
    sink_faults: dict[str, int]
    lost_examples: list[str]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.still_queued == 0

    def text(self) -> str:
        return "\n".join([
            f"soak: {self.streams} streams, {self.seconds:.0f} s, {self.requests:,} requests "
            f"({self.resent_requests:,} resent); answers {json.dumps(self.answers, sort_keys=True)}",
            f"  SQS faults injected: {json.dumps(self.sqs_faults, sort_keys=True)}",
            f"  sink faults injected: {json.dumps(self.sink_faults, sort_keys=True)}",
            f"  messages sent       {self.sent:>10,}",
            f"  acked (200)         {self.acked:>10,}",
            f"  delivered to sink   {self.delivered:>10,}   ({self.deliveries:,} deliveries)",
            f"  duplicated          {self.duplicated:>10,}",
            f"  delivered, unacked  {self.delivered_unacked:>10,}",
            f"  in DLQ              {self.in_dlq:>10,}",
            f"  still queued        {self.still_queued:>10,}   (drained: {self.drained})",
            f"  LOST                {self.lost:>10,}" + (
                f"   e.g. {', '.join(self.lost_examples)}" if self.lost else ""),
        ])


def fault_counts(counts: FaultCounts) -> dict[str, int]:
    """The proxy's counters (``asdict`` would try to copy its lock)."""
    return {f.name: getattr(counts, f.name) for f in fields(counts) if f.name != "lock"}


def build_report(runs: list[StreamRun], sink: SinkCounts, dlq_ids: list[str],
                 queued_ids: list[str], seconds: float, drained: bool,
                 sqs_faults: dict[str, int]) -> Report:
    """Set arithmetic over message ids; nothing here trusts the app's own counts."""
    acked = {i for run in runs for i in run.acked_ids()}
    sent = {i for run in runs for i in run.offered}
    delivered = set(sink.delivered)
    lost = sorted(acked - delivered - set(dlq_ids) - set(queued_ids))
    answers: Counter = Counter()
    for run in runs:
        answers.update(run.stats.statuses)
    return Report(
        streams=len(runs), seconds=seconds,
        requests=sum(run.stats.requests for run in runs),
        resent_requests=sum(run.stats.retries for run in runs),
        sent=len(sent), acked=len(acked), delivered=len(acked & delivered),
        deliveries=sum(sink.delivered.values()),
        duplicated=sum(count - 1 for count in sink.delivered.values()),
        delivered_unacked=len(delivered - acked),
        in_dlq=len(set(dlq_ids)), still_queued=len(set(queued_ids) & acked), lost=len(lost),
        drained=drained, answers=dict(answers), sqs_faults=sqs_faults,
        sink_faults={"posts": sink.posts, "rejected_500": sink.rejected, "hung": sink.hung},
        lost_examples=lost[:5],
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--duration", type=float, default=60, help="seconds of streaming (60)")
    add("--streams", type=int, default=4, help="simulated flespi streams at once (4)")
    add("--batch", type=int, default=20, help="messages per request (20)")
    add("--devices", type=int, default=10, help="devices per stream (10)")
    add("--rate", type=float, default=10,
        help="messages/s per stream; 0: full speed (10: moto, the local SQS, slows down "
             "as its queue grows, so the streams stay within what it drains)")
    add("--packing", choices=["off", "on"], default="off", help="the app's PACKING (off)")
    add("--consumers", type=int, default=2, help="local triggers polling the queue (2)")
    add("--server-error", type=float, default=0.02, help="SQS call answered 500 (0.02)")
    add("--throttle", type=float, default=0.02, help="SQS call throttled (0.02)")
    add("--reset-before", type=float, default=0.01, help="connection reset, not stored (0.01)")
    add("--reset-after", type=float, default=0.01, help="stored, then reset (0.01)")
    add("--entry-failed", type=float, default=0.02, help="batch entry Failed (0.02)")
    add("--entry-sender-fault", type=float, default=0.005,
        help="batch entry Failed for good: the app answers 503 and the stream resends (0.005)")
    add("--sink-fail", type=float, default=0.05, help="sink POST answered 500 (0.05)")
    add("--sink-hang", type=float, default=0.005,
        help="sink POST answered after the consumer's deadline (0.005)")
    add("--no-faults", action="store_true", help="all fault rates 0")
    add("--visibility-timeout", type=int, default=3, help="queue visibility timeout, s (3)")
    add("--max-receive-count", type=int, default=5, help="receives before the DLQ (5)")
    add("--drain-timeout", type=float, default=120, help="max seconds to empty the queue (120)")
    add("--seed", type=int, default=1)
    add("--report", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.no_faults:
        for name in ("server_error", "throttle", "reset_before", "reset_after", "entry_failed",
                     "entry_sender_fault", "sink_fail", "sink_hang"):
            setattr(args, name, 0.0)
    return args


class Heartbeat:
    """A line every ``every`` seconds while the streams run, so a long soak shows life."""

    def __init__(self, log: Any, pipeline: Pipeline, started: float, every: float = 15) -> None:
        self._log, self._pipeline, self._started, self._every = log, pipeline, started, every
        self._stop = threading.Event()

    def __enter__(self) -> "Heartbeat":
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                queued = f"{self._pipeline.queued():,}"
            except BotoCoreError:
                queued = "?"
            self._log(f"  {time.monotonic() - self._started:5.0f} s: {queued} queued")


#: Seconds the consumer's http sink may wait for one POST; a hung POST waits longer.
SINK_TIMEOUT = 1.0


def soak(args: argparse.Namespace, log: Any) -> Report:
    """Start everything, stream, drain, stop, count."""
    moto, moto_port = local_run.start_sqs(0)
    moto_url = f"http://{HOST}:{moto_port}"
    plan = FaultPlan(server_error=args.server_error, throttle=args.throttle,
                     reset_before=args.reset_before, reset_after=args.reset_after,
                     entry_failed=args.entry_failed, entry_sender_fault=args.entry_sender_fault,
                     seed=args.seed)
    try:
        with FaultySqs(moto_url, plan) as proxy, SinkReceiver(
                fail=args.sink_fail, hang=args.sink_hang, hang_seconds=SINK_TIMEOUT * 2,
                seed=args.seed) as receiver:
            local_run.point_aws_at(proxy.url)  # the app's sender goes through the faults
            queue = "soak"
            os.environ.update(QUEUE_NAME=queue, PACKING=args.packing, SINK="http",
                              SINK_URL=receiver.url, SINK_TIMEOUT_SECONDS=str(SINK_TIMEOUT))
            options = local_run.Options(ROOT, "dev", 0, 0, "soak-key", args.max_receive_count,
                                        args.visibility_timeout)
            app, config = local_run.load_app(options)
            # moto answers slowly when busy: wait rather than fail the trigger.
            sqs = boto3.client("sqs", endpoint_url=moto_url, config=BotoConfig(
                read_timeout=300, retries={"max_attempts": 10, "mode": "standard"}))
            settings = StreamSettings(streams=args.streams, batch=args.batch,
                                      devices=args.devices, rate=args.rate,
                                      duration=args.duration, seed=args.seed)
            with Pipeline(app, config, sqs, queue, visibility_timeout=args.visibility_timeout,
                          max_receive_count=args.max_receive_count,
                          consumers=args.consumers) as pipeline:
                log(f"soak: {args.streams} streams x {args.duration:g} s -> {pipeline.url} "
                    f"(PACKING={args.packing}); SQS faults via {proxy.url}, sink {receiver.url}")
                started = time.monotonic()
                with Heartbeat(log, pipeline, started):
                    runs = run_streams(pipeline.url, pipeline.api_key, settings)
                seconds = time.monotonic() - started
                log(f"streams done: {sum(r.stats.acked for r in runs):,} acked; draining "
                    f"({pipeline.queued():,} queued)")
                drained = pipeline.wait_drained(args.drain_timeout)
                pipeline.stop_consumers()
                dlq = take_all(sqs, pipeline.queue_url(pipeline.dlq_name))
                queued = take_all(sqs, pipeline.queue_url())
            return build_report(runs, receiver.counts, message_ids(m["Body"] for m in dlq),
                                message_ids(m["Body"] for m in queued), seconds, drained,
                                fault_counts(proxy.counts))
    finally:
        moto.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Two local triggers share the container's one-connection sink pool.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # The app logs a line per request and per batch on stderr: to a file.
    app_log = tempfile.NamedTemporaryFile("w", prefix="soak-app-", suffix=".log", delete=False)
    terminal = sys.stderr

    def log(line: str) -> None:
        terminal.write(line + "\n")
        terminal.flush()

    sys.stderr = app_log
    try:
        report = soak(args, log)
    finally:
        sys.stderr = terminal
        app_log.close()
    print(report.text())
    print(f"  app log: {app_log.name}")
    if args.report:
        args.report.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
