"""Consumer throughput: flespi messages per second through ``consumer.handle``.

Runs the real handler on Lambda-shaped SQS events, for both sinks and both
record shapes:

* ``log`` writes to a file (stdout redirected), as Lambda's stdout pipe would;
* ``http`` POSTs to a receiver on loopback in a separate process, so the
  receiver does not compete with the consumer for the GIL;
* ``unpacked``: 100 records of one message (``PACKING=off``, the default
  ``CONSUME_BATCH_SIZE``); ``packed``: 5 records of 1,000 messages each
  (``PACKING=on``; ~3 MB per invocation, inside Lambda's 6 MB event limit).

The per-invocation metrics line goes to a file too, so its cost is counted.
Usage: ``python -m tools.bench_consumer [--seconds 2.5]`` (per case).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable, Iterator

import orjson

from chalicelib import config, consumer

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"unpacked": (100, 1), "packed": (5, 1000)}  # records, messages per record


@dataclass
class Result:
    sink: str
    shape: str
    records: int
    messages: int
    body_bytes: int
    timings: list[float]

    def row(self) -> str:
        total = sum(self.timings)
        calls = len(self.timings)
        return (
            f"{self.sink:<5} {self.shape:<9} {self.records:>7} {self.messages:>8} "
            f"{calls:>11} {statistics.median(self.timings) * 1000:>9.2f} "
            f"{self.messages * calls / total:>10,.0f} {self.body_bytes * calls / total / 1e6:>6.1f}"
        )


HEADER = (
    f"{'sink':<5} {'records':<9} {'rec/inv':>7} {'msg/inv':>8} "
    f"{'invocations':>11} {'p50 ms':>9} {'msg/s':>10} {'MB/s':>6}"
)


def flespi_messages(count: int) -> list[dict]:
    """``count`` realistic messages: the samples with their ident and time varied."""
    samples = orjson.loads((ROOT / "samples" / "flespi_messages.json").read_bytes())
    start = int(time.time())
    return [
        {**samples[i % len(samples)], "ident": f"35262533{i % 500:07d}", "timestamp": start + i}
        for i in range(count)
    ]


def event(records: int, per_record: int) -> tuple[dict, int]:
    """A Lambda SQS event of ``records`` bodies, and its body bytes."""
    messages = flespi_messages(records * per_record)
    bodies = [
        orjson.dumps(messages[i] if per_record == 1 else messages[i : i + per_record]).decode()
        for i in range(0, len(messages), per_record)
    ]
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": uuid.uuid4().hex,
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:flespi-bench",
                "awsRegion": "us-east-1",
            }
            for body in bodies
        ]
    }, sum(map(len, bodies))


def measure(run: Callable[[], dict], seconds: float) -> list[float]:
    """Call ``run`` repeatedly for about ``seconds``; every call must succeed."""
    timings: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < 3:
        started = time.perf_counter()
        response = run()
        timings.append(time.perf_counter() - started)
        if response["batchItemFailures"]:
            raise SystemExit(f"benchmark run failed records: {response}")
    return timings


def serve(port_out: multiprocessing.connection.Connection) -> None:
    """The receiver process: read each POST whole, answer 200, keep the connection."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    port_out.send(server.server_address[1])
    server.serve_forever()


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    """The URL of a fresh receiver process, stopped afterwards."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=serve, args=(child,), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{parent.recv()}/"
    finally:
        process.terminate()
        process.join()


def bench(seconds: float) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory() as tmp, receiver() as url:
        sinks = {
            "log": config.Settings(queue_name="flespi-bench"),
            "http": config.Settings(queue_name="flespi-bench", sink="http", sink_url=url),
        }
        for shape, (records, per_record) in SHAPES.items():
            sqs_event, body_bytes = event(records, per_record)
            for sink, settings in sinks.items():
                out = open(Path(tmp) / f"{sink}-{shape}.out", "w", buffering=1 << 20)
                err = open(Path(tmp) / f"{sink}-{shape}.err", "w")
                with out, err, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    timings = measure(
                        lambda: consumer.handle(sqs_event, None, settings), seconds
                    )
                results.append(
                    Result(sink, shape, records, records * per_record, body_bytes, timings)
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="time per case")
    args = parser.parse_args()
    print("consumer throughput (consumer.handle, one process; http receiver in another)")
    print(HEADER)
    for result in bench(args.seconds):
        print(result.row())


if __name__ == "__main__":
    main()
