"""The flespi stream simulator against a scripted receiver over real HTTP."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tools import simulate


class Receiver:
    """A loopback HTTP server answering with scripted statuses (then 200), recording requests."""

    def __init__(self, statuses: list[int] | None = None, delays: list[float] | None = None):
        self.statuses = list(statuses or [])
        self.delays = list(delays or [])
        self.requests: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                if receiver.delays:
                    time.sleep(receiver.delays.pop(0))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                answer = b'{"message":"Forbidden"}' if status == 403 else b"{}"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/flespi"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def batches(self) -> list[list[dict]]:
        return [json.loads(body) for _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver(request):
    """A Receiver; parametrize it indirectly with its ``statuses``/``delays``."""
    server = Receiver(**getattr(request, "param", {}))
    yield server
    server.close()


def scripted(**script):
    """Run the test against a receiver following ``script``."""
    return pytest.mark.parametrize("receiver", [script], indirect=True)


def simulate_main(receiver: Receiver, *args: str) -> int:
    return simulate.main(["--url", receiver.url, "--api-key", "k", "--backoff", "0.01",
                          "--seed", "7", *args])


def test_stream_of_realistic_messages(receiver, samples, capsys):
    assert simulate_main(receiver, "--count", "25", "--batch", "10", "--devices", "3") == 0

    batches = receiver.batches()
    assert [len(b) for b in batches] == [10, 10, 5]
    headers = receiver.requests[0][0]
    assert headers["x-api-key"] == "k"
    assert headers["Content-Type"] == "application/json"
    messages = [m for b in batches for m in b]
    idents = Counter(m["ident"] for m in messages)
    assert len(idents) == 3 and set(idents.values()) == {9, 8}
    for number, message in enumerate(messages[:3]):
        assert set(message) == set(samples[number])  # the sample's keys, all of them
        assert message["timestamp"] == pytest.approx(time.time(), abs=30)
    track = {(m["position.latitude"], m["position.longitude"])
             for m in messages if m["ident"] == messages[0]["ident"]}
    assert len(track) > 1  # the device moves
    assert "acked 25 messages" in capsys.readouterr().out


@scripted(statuses=[503, 500, 200, 200])
def test_failed_batch_is_resent_whole_until_200(receiver, capsys):
    assert simulate_main(receiver, "--count", "20", "--batch", "10") == 0

    bodies = [body for _, body in receiver.requests]
    assert len(bodies) == 4
    assert bodies[0] == bodies[1] == bodies[2] != bodies[3]
    out = capsys.readouterr().out
    assert "retries 2" in out and '"503": 1' in out and "acked 20 messages" in out


@scripted(delays=[1.0])
def test_timeout_counts_as_failure(receiver, capsys):
    assert simulate_main(receiver, "--count", "5", "--batch", "5", "--timeout", "0.2") == 0

    assert len(receiver.requests) == 2
    assert receiver.requests[0][1] == receiver.requests[1][1]
    assert "ReadTimeoutError" in capsys.readouterr().out


@scripted(statuses=[403])
def test_wrong_key_ends_the_run(receiver):
    assert simulate_main(receiver, "--count", "100") == 2
    assert len(receiver.requests) == 1


def test_rate_is_held(receiver):
    started = time.monotonic()
    assert simulate_main(receiver, "--count", "40", "--batch", "10", "--rate", "100") == 0
    # Batches 2, 3 and 4 are due 0.1, 0.2 and 0.3 s after the start.
    assert time.monotonic() - started >= 0.3
    assert len(receiver.requests) == 4


def test_duration_bounds_an_endless_stream(receiver):
    started = time.monotonic()
    assert simulate_main(receiver, "--count", "0", "--duration", "0.5", "--rate", "200") == 0
    assert 0.4 <= time.monotonic() - started < 2
    assert 1 <= len(receiver.requests) <= 2
