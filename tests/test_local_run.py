"""``make run`` end to end: the runner as a real process, over real HTTP and its own SQS."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import boto3
import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.slow

KEY = "test-key-123"

TEST_APP = '''
import os

import boto3
from chalice import Chalice

app = Chalice(app_name="runner-test")
QUEUE = os.environ["QUEUE_NAME"]


@app.route("/in", methods=["POST"], api_key_required=True)
def put():
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
    for body in app.current_request.json_body:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    return {"sent": len(app.current_request.json_body)}


@app.route("/open")
def open_route():
    return {"open": True}


@app.on_sqs_message(queue=QUEUE, batch_size=10)
def consume(event):
    failed = []
    for record in event:
        count = record.to_dict()["attributes"]["ApproximateReceiveCount"]
        print(f"got {record.body} {count}", flush=True)
        if record.body.startswith("fail"):
            failed.append({"itemIdentifier": record.to_dict()["messageId"]})
    return {"batchItemFailures": failed}
'''


class Runner:
    """``python -m tools.local_run`` in its own session, its output collected by threads."""

    def __init__(self, project_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.sqs_port = free_port()
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("QUEUE_NAME", "AWS_ENDPOINT_URL")}
        environ.update(PORT=str(self.port), SQS_PORT=str(self.sqs_port), API_KEY=KEY, **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.local_run", "--project-dir", str(project_dir)],
            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()
        self.wait_for(lambda: any("ready:" in line for line in self.stderr), 60)

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        """Poll ``condition``; fail with the runner's stderr if it never holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("runner: condition not met; stderr:\n" + "\n".join(self.stderr))
            time.sleep(0.05)

    def request(self, path: str, body: bytes | None = None, headers: dict | None = None,
                method: str = "POST") -> tuple[int, dict]:
        """One HTTP request; returns status and JSON body, whatever the status."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Signal the runner and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def make_project(tmp_path: Path) -> Path:
    """A tiny Chalice project whose consumer fails every record with a body starting 'fail'."""
    (tmp_path / ".chalice").mkdir()
    (tmp_path / ".chalice" / "config.json").write_text(json.dumps({
        "version": "2.0", "app_name": "runner-test",
        "stages": {"dev": {"environment_variables": {"QUEUE_NAME": "runner-test"}}},
    }))
    (tmp_path / "app.py").write_text(textwrap.dedent(TEST_APP))
    return tmp_path


@pytest.fixture(scope="module")
def test_runner(tmp_path_factory):
    runner = Runner(make_project(tmp_path_factory.mktemp("app")),
                    VISIBILITY_TIMEOUT="1", MAX_RECEIVE_COUNT="2")
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def repo_runner():
    """The project's own app, as ``make run`` starts it."""
    runner = Runner(ROOT)
    yield runner
    runner.stop()


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 403),
    ({"x-api-key": "wrong"}, 403),
    ({"x-api-key": KEY.upper()}, 403),
    ({"x-api-key": KEY}, 200),
    ({"X-API-Key": KEY}, 200),
])
def test_api_key_required_route(test_runner, headers, status):
    code, body = test_runner.request("/in", b"[]", {"Content-Type": "application/json", **headers})
    assert code == status
    assert body == ({"message": "Forbidden"} if status == 403 else {"sent": 0})


def test_route_without_api_key_is_open(test_runner):
    assert test_runner.request("/open", method="GET") == (200, {"open": True})


def test_requests_are_logged(test_runner):
    test_runner.request("/in", b"[]", {"Content-Type": "application/json"})
    test_runner.wait_for(lambda: any("POST /in -> 403 in" in line for line in test_runner.stderr))


def test_failed_record_is_redelivered_then_dead_lettered(test_runner):
    code, _ = test_runner.request("/in", json.dumps(["ok-1", "fail-1"]).encode(),
                                  {"Content-Type": "application/json", "x-api-key": KEY})
    assert code == 200
    test_runner.wait_for(lambda: {"got ok-1 1", "got fail-1 1", "got fail-1 2"}
                         <= set(test_runner.stdout))
    sqs = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{test_runner.sqs_port}",
                       region_name="us-east-1")
    dlq = sqs.get_queue_url(QueueName="runner-test-dlq")["QueueUrl"]
    received = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=5)["Messages"]
    assert [m["Body"] for m in received] == ["fail-1"]
    assert "got fail-1 3" not in test_runner.stdout
    assert "got ok-1 2" not in test_runner.stdout
    assert any("consume: " in line and ", 1 failed," in line for line in test_runner.stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_everything(tmp_path, signum):
    runner = Runner(make_project(tmp_path))
    assert runner.stop(signum) == 0
    for port in (runner.port, runner.sqs_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # The runner led its own session: nothing of its process group is left.
    with pytest.raises(ProcessLookupError):
        os.killpg(runner.proc.pid, 0)
    assert any("stopped" in line for line in runner.stderr)


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}])
def test_flespi_route_demands_the_key(repo_runner, samples, headers):
    code, body = repo_runner.request("/flespi", json.dumps(samples).encode(),
                                     {"Content-Type": "application/json", **headers})
    assert (code, body) == (403, {"message": "Forbidden"})


def test_posted_messages_reach_the_log_sink(repo_runner, samples):
    code, body = repo_runner.request("/flespi", json.dumps(samples).encode(),
                                     {"Content-Type": "application/json", "x-api-key": KEY})
    assert code == 200
    assert body["accepted"] == len(samples)

    def printed() -> list[dict]:
        return [json.loads(line) for line in repo_runner.stdout if line.startswith("{")]

    repo_runner.wait_for(lambda: len(printed()) >= len(samples), timeout=10)
    key = lambda message: json.dumps(message, sort_keys=True)  # noqa: E731
    assert sorted(map(key, printed())) == sorted(map(key, samples))
