"""A fault-injecting SQS: an HTTP proxy in front of a real (moto) SQS.

It sits at the HTTP boundary, so the code under test runs unchanged and
sees exactly what a misbehaving SQS would send it: whole calls answered 500
or throttled, calls that hang, connections reset before or after SQS stored
the messages, and batch entries reported ``Failed`` (which the proxy then
really does not store). Only SendMessageBatch and SendMessage are disturbed;
every other call passes through, so queues can be created and read as usual.

Used by the ingest tests, the reliability suite and ``make soak``; run it by
hand with ``python -m tools.faulty_sqs --upstream URL --port N``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_SEND_TARGETS = ("AmazonSQS.SendMessageBatch", "AmazonSQS.SendMessage")


@dataclass
class FaultPlan:
    """Probabilities (0..1) of each fault, drawn independently per call/entry."""

    server_error: float = 0.0  # whole call answered 500 (nothing stored)
    throttle: float = 0.0  # whole call answered 400 ThrottlingException
    reset_before: float = 0.0  # connection closed before forwarding
    reset_after: float = 0.0  # forwarded (stored!), then connection closed
    entry_failed: float = 0.0  # entry reported Failed, retryable, not stored
    entry_sender_fault: float = 0.0  # entry Failed with SenderFault: permanent
    delay: float = 0.0  # seconds added before answering a send call
    seed: int | None = None


@dataclass
class FaultCounts:
    """What the proxy did, for assertions and reports."""

    calls: int = 0
    server_errors: int = 0
    throttles: int = 0
    resets_before: int = 0
    resets_after: int = 0
    entries_failed: int = 0
    entries_stored: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + amount)


class FaultySqs:
    """The proxy server; ``url`` is what to put in ``AWS_ENDPOINT_URL``."""

    def __init__(self, upstream: str, plan: FaultPlan, port: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.plan = plan
        self.counts = FaultCounts()
        self._random = random.Random(plan.seed)
        self._random_lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultySqs":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def chance(self, probability: float) -> bool:
        """One seeded draw, shared by all handler threads."""
        if probability <= 0:
            return False
        with self._random_lock:
            return self._random.random() < probability

    def forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
        """Pass a call to the real SQS and return its answer."""
        connection = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=30
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def _handler_for(proxy: FaultySqs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: tests read counts
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            # The body may be rewritten, so its length is set anew on forwarding.
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length")}
            if self.headers.get("X-Amz-Target") in _SEND_TARGETS:
                self._send_call(headers, body)
            else:
                self._reply(*proxy.forward("POST", self.path, headers, body))

        def do_GET(self) -> None:
            self._reply(*proxy.forward("GET", self.path, dict(self.headers.items()), b""))

        def _send_call(self, headers: dict, body: bytes) -> None:
            plan, counts = proxy.plan, proxy.counts
            counts.bump("calls")
            if plan.delay:
                time.sleep(plan.delay)
            if proxy.chance(plan.reset_before):
                counts.bump("resets_before")
                return self._reset()
            if proxy.chance(plan.server_error):
                counts.bump("server_errors")
                return self._error(500, "InternalError", "injected 500")
            if proxy.chance(plan.throttle):
                counts.bump("throttles")
                return self._error(400, "ThrottlingException", "injected throttling")
            request = json.loads(body)
            failed = self._drop_entries(request)
            if failed and not request["Entries"]:  # SQS answers 200, every entry Failed
                answer = json.dumps({"Successful": [], "Failed": failed}).encode()
                return self._reply(200, [("Content-Type", "application/x-amz-json-1.0")], answer)
            status, answer_headers, answer = proxy.forward(
                "POST", self.path, headers, json.dumps(request).encode()
            )
            if proxy.chance(plan.reset_after):
                counts.bump("resets_after")
                return self._reset()
            if status == 200 and failed:
                merged = json.loads(answer)
                merged["Failed"] = merged.get("Failed", []) + failed
                answer = json.dumps(merged).encode()
            if status == 200:
                stored = len(json.loads(answer).get("Successful", [])) if "Entries" in request else 1
                counts.bump("entries_stored", stored)
            self._reply(status, answer_headers, answer)

        def _drop_entries(self, request: dict) -> list[dict]:
            """Remove entries the plan fails; return their Failed records."""
            plan = proxy.plan
            if "Entries" not in request:
                return []
            kept, failed = [], []
            for entry in request["Entries"]:
                if proxy.chance(plan.entry_sender_fault):
                    failed.append(_failed(entry["Id"], "InvalidMessageContents", True))
                elif proxy.chance(plan.entry_failed):
                    failed.append(_failed(entry["Id"], "InternalError", False))
                else:
                    kept.append(entry)
            proxy.counts.bump("entries_failed", len(failed))
            request["Entries"] = kept
            return failed

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message})
            headers = [
                ("Content-Type", "application/x-amz-json-1.0"),
                ("x-amzn-query-error", f"{code};Sender"),
            ]
            self._reply(status, headers, body.encode())

        def _reset(self) -> None:
            """Close the socket with RST, no answer: the client sees a reset."""
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
            self.connection.close()

        def _reply(self, status: int, headers: list, body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "transfer-encoding", "connection",
                                        "date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _failed(entry_id: str, code: str, sender_fault: bool) -> dict:
    return {"Id": entry_id, "SenderFault": sender_fault, "Code": code, "Message": "injected"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the real SQS endpoint URL")
    parser.add_argument("--port", type=int, default=0)
    for name in ("server_error", "throttle", "reset_before", "reset_after", "entry_failed"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    plan = FaultPlan(
        server_error=args.server_error, throttle=args.throttle, reset_before=args.reset_before,
        reset_after=args.reset_after, entry_failed=args.entry_failed, delay=args.delay,
    )
    with FaultySqs(args.upstream, plan, args.port) as proxy:
        print(f"fault-injecting SQS on {proxy.url} -> {args.upstream}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
