"""Plays a flespi HTTP stream against a Lambda handler in this process, and measures.

The benchmark feeds handlers exactly what Lambda would hand them: realistic
flespi batches (the samples as templates, a fleet of devices moving, ~600 bytes
a message) wrapped in an API Gateway REST proxy event, and a context object
with a real deadline. Generation is deterministic (seeded), so every
configuration of one benchmark run handles byte-identical requests.

``tools.bench_worker`` calls ``run`` in a fresh interpreter per measurement.
"""
from __future__ import annotations

import base64
import gc
import json
import random
import resource
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Callable

from tools.sqs_standin import read_stats

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "flespi_messages.json"
API_KEY = "bench-api-key"
#: flespi's documented source network.
FLESPI_IP = "185.213.2.10"
#: The Lambda timeout .chalice/config.json gives api_handler.
LAMBDA_TIMEOUT_S = 29.0


class FlespiStream:
    """Deterministic flespi traffic: sample messages with varied ident, time and position."""

    def __init__(self, seed: int = 1, devices: int = 200) -> None:
        self._templates: list[dict] = json.loads(SAMPLES.read_text(encoding="utf-8"))
        self._rng = random.Random(seed)
        self._idents = [str(self._rng.randrange(10**14, 10**15)) for _ in range(devices)]
        self._clock = 1_700_000_000.0
        self._sent = 0

    def message(self) -> dict:
        """The next message: the templates in turn, so sizes mix as in the samples."""
        message = dict(self._templates[self._sent % len(self._templates)])
        self._sent += 1
        self._clock += 0.05
        message["ident"] = self._rng.choice(self._idents)
        message["timestamp"] = round(self._clock, 1)
        message["server.timestamp"] = round(self._clock + self._rng.uniform(0.2, 3.0), 6)
        for key in ("position.latitude", "position.longitude"):
            if key in message:
                message[key] = round(message[key] + self._rng.uniform(-0.05, 0.05), 6)
        return message

    def body(self, count: int) -> bytes:
        """A request body of ``count`` messages, compact UTF-8 JSON as flespi posts it.

        Messages are serialised one at a time so that building a large body
        does not itself drive the process's peak memory above handling it.
        """
        parts = (
            json.dumps(self.message(), ensure_ascii=False, separators=(",", ":")).encode()
            for _ in range(count)
        )
        return b"[" + b",".join(parts) + b"]"


def api_gateway_event(body: bytes, binary: bool) -> dict:
    """An API Gateway REST proxy event for ``POST /flespi`` carrying ``body``.

    ``binary``: the API declares application/json a binary media type (ours
    does), so API Gateway base64-encodes the body; otherwise it passes text.
    No ``Accept`` header: flespi's request headers are undocumented, so the
    bench does not assume one.
    """
    headers = {
        "Content-Type": "application/json",
        "Host": "abcdef1234.execute-api.eu-central-1.amazonaws.com",
        "User-Agent": "flespi",
        "X-Forwarded-For": FLESPI_IP,
        "X-Forwarded-Proto": "https",
        "x-api-key": API_KEY,
    }
    request_id = str(uuid.uuid4())
    return {
        "resource": "/flespi",
        "path": "/flespi",
        "httpMethod": "POST",
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/flespi",
            "httpMethod": "POST",
            "path": "/api/flespi",
            "stage": "api",
            "requestId": request_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "identity": {"sourceIp": FLESPI_IP, "apiKey": API_KEY, "userAgent": "flespi"},
        },
        "body": base64.b64encode(body).decode("ascii") if binary else body.decode("utf-8"),
        "isBase64Encoded": binary,
    }


class LambdaContext:
    """What the Lambda Python runtime passes as ``context``, with a running deadline."""

    function_name = "flespi-sqs-dev"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:eu-central-1:000000000000:function:flespi-sqs-dev"
    memory_limit_in_mb = "1024"
    log_group_name = "/aws/lambda/flespi-sqs-dev"
    log_stream_name = "2024/01/01/[$LATEST]bench"
    identity = None
    client_context = None

    def __init__(self, timeout_s: float = LAMBDA_TIMEOUT_S) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def response_status(response: dict) -> tuple[int, str]:
    """Status and text body of a proxy response (Chalice base64s binary-typed bodies)."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    return int(response["statusCode"]), body


class HandlerFailed(Exception):
    """The handler answered something other than 200: the run measures nothing."""


def invoke(handler: Callable[[dict, object], dict], event: dict) -> float:
    """Call the handler as Lambda would; its wall time, or raise unless it answered 200."""
    context = LambdaContext()
    t0 = time.perf_counter()
    response = handler(event, context)
    elapsed = time.perf_counter() - t0
    status, body = response_status(response)
    if status != 200:
        raise HandlerFailed(f"HTTP {status}: {body[:300]}")
    return elapsed


def run(handler: Callable | Exception, binary: bool, spec_json: str, import_s: float) -> str:
    """The worker's job as JSON: a first (cold) request, then the measurement ``spec`` asks.

    ``handler`` is the exception instead when importing it failed.
    """
    spec = json.loads(spec_json)
    try:
        if isinstance(handler, Exception):
            raise handler
        stream = FlespiStream(spec["seed"])
        first = stream.body(spec["messages"])
        spec["bytes_per_message"] = len(first) / spec["messages"]
        first_s = invoke(handler, api_gateway_event(first, binary))
        measure = measure_throughput if spec["mode"] == "throughput" else measure_memory
        result = {
            "import_ms": import_s * 1000,
            "first_response_ms": (import_s + first_s) * 1000,
            **measure(handler, stream, binary, spec),
        }
    except Exception as error:  # the parent shows it as this configuration's result
        result = {"error": f"{type(error).__name__}: {error}"}
    return json.dumps(result)


def measure_throughput(handler: Callable, stream: FlespiStream, binary: bool, spec: dict) -> dict:
    """One flespi stream: requests one after another; wall, CPU and what SQS saw."""
    bodies = [stream.body(spec["messages"]) for _ in range(spec["requests"])]
    events = [api_gateway_event(body, binary) for body in bodies]
    gc.collect()
    read_stats(spec["endpoint"], reset=True)
    cpu0 = time.process_time()
    walls = [invoke(handler, event) for event in events]
    cpu = time.process_time() - cpu0
    return {
        "walls": walls,
        "cpu_s": cpu,
        "messages": spec["messages"] * spec["requests"],
        "body_bytes": sum(map(len, bodies)),
        "sqs": read_stats(spec["endpoint"]),
    }


def measure_memory(handler: Callable, stream: FlespiStream, binary: bool, spec: dict) -> dict:
    """One large request, twice: first the process's max RSS (what Lambda reports
    as Max Memory Used), then tracemalloc's peak of what handling allocates
    (tracemalloc slows handling, so it stays off for the first)."""
    count = max(1, round(spec["memory_bytes"] / spec["bytes_per_message"]))
    body = stream.body(count)
    event = api_gateway_event(body, binary)
    gc.collect()
    invoke(handler, event)
    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    event = api_gateway_event(stream.body(count), binary)
    gc.collect()
    tracemalloc.start()
    try:
        invoke(handler, event)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {
        "request_bytes": len(body),
        "max_rss_mb": max_rss_kib / 1024,
        "traced_peak_mb": peak / 2**20,
    }
