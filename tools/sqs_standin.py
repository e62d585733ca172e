"""A latency-controlled SQS stand-in for benchmarks: it answers like SQS, after a fixed delay.

moto is far too slow to time a sender against (it rescans the queue on every
send), and real SQS is noisy and costs money. This server speaks just enough of
the AWS JSON 1.0 protocol that botocore uses for SQS (``POST /`` with
``X-Amz-Target: AmazonSQS.<Op>``) to take ``GetQueueUrl``, ``SendMessage`` and
``SendMessageBatch``, and answers each send exactly ``latency`` after it has
received the whole request, so a benchmark measures the sender, not the queue.

It runs in its own process (``StandIn`` starts it) so its CPU never competes
with the measured code for the GIL, and it is a single asyncio loop with a
minimal HTTP/1.1 parser, so a hundred concurrent keep-alive connections cost it
next to nothing. It keeps no messages: it counts them. ``GET /stats`` returns
the counters as JSON; ``DELETE /stats`` returns and resets them.

It enforces SQS's batch limits (10 entries, 1 MiB per call, distinct ids) with
SQS's own error codes, so a sender that breaks them fails here as in AWS
instead of scoring a fast number.

Run alone: ``python tools/sqs_standin.py --latency-ms 12`` prints its port.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import selectors
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import orjson

ACCOUNT = "000000000000"
#: SQS bills every 64 KiB chunk of a request's payload as one request.
BILLING_CHUNK = 64 * 1024
MAX_BATCH_ENTRIES = 10
MAX_BATCH_BYTES = 1024 * 1024
JSON_TYPE = b"application/x-amz-json-1.0"


@dataclass
class Stats:
    """What the senders did; the benchmark reads deltas of these around a run."""

    calls: dict[str, int] = field(default_factory=dict)
    #: SQS messages taken (batch entries plus single sends).
    entries: int = 0
    #: flespi messages inside them: a body starting with ``[`` is a packed array.
    messages: int = 0
    #: payload bytes as SQS counts them: UTF-8 bodies plus message attributes.
    payload_bytes: int = 0
    #: sum over send calls of ceil(payload bytes / 64 KiB), what AWS bills.
    billed_requests: int = 0
    #: calls answered with an SQS error (a limit broken).
    rejected: int = 0
    #: SQS calls answered, and their total wait from receipt to answer: the
    #: latency really applied (the event loop may wake up to ~1 ms late).
    answered: int = 0
    answer_wait_s: float = 0.0
    connections: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class SqsError(Exception):
    """An SQS client error: code as in AWS's query-compatible error header."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def entry_payload_bytes(entry: dict) -> int:
    """Bytes SQS counts toward size limits and billing: body plus attributes."""
    size = len(entry["MessageBody"].encode("utf-8"))
    for name, attribute in entry.get("MessageAttributes", {}).items():
        size += len(name.encode("utf-8")) + len(attribute["DataType"].encode("utf-8"))
        value = attribute.get("StringValue", attribute.get("BinaryValue", ""))
        size += len(value.encode("utf-8")) if isinstance(value, str) else len(value)
    return size


def flespi_messages_in(body: str) -> int:
    """How many flespi messages an SQS body holds (the contract: ``[`` means packed)."""
    return len(orjson.loads(body)) if body.startswith("[") else 1


class SqsStandIn:
    """The protocol and the counters; ``serve`` binds it to a socket."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.stats = Stats()
        self.port = 0
        self._message_ids = itertools.count()

    def _message_id(self) -> str:
        """Unique and UUID-shaped; cheaper than uuid4 and nobody checks randomness."""
        n = next(self._message_ids)
        return f"00000000-0000-4000-8000-{n:012x}"

    def _count_send(self, entries: list[dict]) -> None:
        payload = sum(entry_payload_bytes(entry) for entry in entries)
        if payload > MAX_BATCH_BYTES:
            raise SqsError(
                "AWS.SimpleQueueService.BatchRequestTooLong",
                f"Batch requests cannot be longer than {MAX_BATCH_BYTES} bytes; got {payload}",
            )
        self.stats.entries += len(entries)
        self.stats.messages += sum(flespi_messages_in(e["MessageBody"]) for e in entries)
        self.stats.payload_bytes += payload
        self.stats.billed_requests += max(1, math.ceil(payload / BILLING_CHUNK))

    def get_queue_url(self, request: dict) -> dict:
        return {"QueueUrl": f"http://127.0.0.1:{self.port}/{ACCOUNT}/{request['QueueName']}"}

    def send_message(self, request: dict) -> dict:
        self._count_send([request])
        return {"MessageId": self._message_id()}

    def send_message_batch(self, request: dict) -> dict:
        entries = request.get("Entries", [])
        if not entries:
            raise SqsError("AWS.SimpleQueueService.EmptyBatchRequest", "no entries")
        if len(entries) > MAX_BATCH_ENTRIES:
            raise SqsError(
                "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
                f"at most {MAX_BATCH_ENTRIES} entries; got {len(entries)}",
            )
        if len({entry["Id"] for entry in entries}) != len(entries):
            raise SqsError("AWS.SimpleQueueService.BatchEntryIdsNotDistinct", "ids repeat")
        self._count_send(entries)
        # MD5OfMessageBody is left out: botocore does not check it (the Java
        # and .NET SDKs do), and hashing every body would only cost CPU here.
        return {
            "Successful": [{"Id": e["Id"], "MessageId": self._message_id()} for e in entries],
            "Failed": [],
        }

    def dispatch(self, target: str, body: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Answer one SQS call: status, JSON body and extra headers."""
        operation = target.removeprefix("AmazonSQS.")
        handler = {
            "GetQueueUrl": self.get_queue_url,
            "SendMessage": self.send_message,
            "SendMessageBatch": self.send_message_batch,
        }.get(operation)
        self.stats.calls[operation] = self.stats.calls.get(operation, 0) + 1
        try:
            if handler is None:
                raise SqsError("AWS.SimpleQueueService.UnsupportedOperation", target)
            return 200, orjson.dumps(handler(orjson.loads(body))), []
        except SqsError as error:
            self.stats.rejected += 1
            short = error.code.rsplit(".", 1)[-1]
            payload = {"__type": f"com.amazonaws.sqs#{short}", "message": str(error)}
            # botocore reads the query-compatible code from this header.
            query_error = f"{error.code};Sender".encode()
            return 400, orjson.dumps(payload), [(b"x-amzn-query-error", query_error)]

    def control(self, method: bytes) -> bytes:
        """``GET /stats`` reads the counters, ``DELETE /stats`` also resets them."""
        snapshot = orjson.dumps(asdict(self.stats))
        if method == b"DELETE":
            in_flight = self.stats.in_flight
            self.stats = Stats(in_flight=in_flight)
        return snapshot

    async def _answer(self, method: bytes, path: bytes, headers: dict, body: bytes) -> tuple:
        if path == b"/stats":
            return 200, self.control(method), []
        received = time.monotonic()
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            answer = self.dispatch(headers.get(b"x-amz-target", b"").decode(), body)
            delay = received + self.latency - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.stats.answered += 1
            self.stats.answer_wait_s += time.monotonic() - received
            return answer
        finally:
            self.stats.in_flight -= 1

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one keep-alive connection: one request at a time, as botocore sends."""
        self.stats.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head[:-4].split(b"\r\n")
                method, path, _ = request_line.split(b" ", 2)
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                status, payload, extra = await self._answer(method, path, headers, body)
                response = [
                    b"HTTP/1.1 %d %s" % (status, b"OK" if status == 200 else b"Bad Request"),
                    b"Content-Type: " + JSON_TYPE,
                    b"Content-Length: %d" % len(payload),
                    *(name + b": " + value for name, value in extra),
                ]
                writer.write(b"\r\n".join(response) + b"\r\n\r\n" + payload)
                await writer.drain()
                if headers.get(b"connection", b"").lower() == b"close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve(self, port: int, ready: Callable[[int], None]) -> None:
        # asyncio disables Nagle on every accepted TCP socket (and botocore on
        # its own), so no 40 ms delayed-ACK stall inflates the latency.
        # A reader limit above the largest request (SQS takes at most 1 MiB of
        # payload, a bit more as JSON) lets a packed call be read in one go
        # instead of pausing the socket every 128 KiB, which a sender would
        # see as latency real SQS does not add.
        server = await asyncio.start_server(
            self.connection, "127.0.0.1", port, backlog=1024, limit=4 * 1024 * 1024
        )
        self.port = server.sockets[0].getsockname()[1]
        ready(self.port)
        async with server:
            await server.serve_forever()


class StandIn:
    """The stand-in running in a child process; a context manager for benchmarks and tests."""

    def __init__(self, latency_ms: float = 12.0) -> None:
        self.latency_ms = latency_ms
        self._process: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> "StandIn":
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--latency-ms", str(self.latency_ms)],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = self._process.stdout.readline().strip()
        if not port:
            self.__exit__()
            raise RuntimeError("the SQS stand-in did not start")
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def stats(self, reset: bool = False) -> dict:
        """The counters so far (``reset`` starts new ones)."""
        return read_stats(self.endpoint, reset)


def read_stats(endpoint: str, reset: bool = False) -> dict:
    """The counters of the stand-in at ``endpoint``; ``reset`` starts new ones."""
    request = urllib.request.Request(endpoint + "/stats", method="DELETE" if reset else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=12.0)
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()

    def ready(port: int) -> None:
        print(port, flush=True)

    try:
        # select() waits with microsecond precision; epoll (asyncio's default)
        # rounds every wait up to a whole millisecond, which would add ~0.5 ms
        # to each call's latency. A hundred-odd sockets are cheap for select().
        loop_factory = lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())  # noqa: E731
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(SqsStandIn(args.latency_ms / 1000).serve(args.port, ready))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
