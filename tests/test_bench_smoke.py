"""The benchmark's parts work: the SQS stand-in speaks botocore's protocol, and
``tools.bench`` runs end to end. Timing is measured, never asserted, except
that the stand-in waits at least its latency (it sleeps: that cannot flake)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from tools.sqs_standin import StandIn

ROOT = Path(__file__).resolve().parent.parent
LATENCY_MS = 30


@pytest.fixture(scope="module")
def standin():
    with StandIn(latency_ms=LATENCY_MS) as running:
        yield running


@pytest.fixture()
def client(standin):
    return boto3.client("sqs", endpoint_url=standin.endpoint, region_name="us-east-1")


def test_standin_answers_boto3_and_counts(standin, client):
    standin.stats(reset=True)
    url = client.get_queue_url(QueueName="flespi-x")["QueueUrl"]
    assert url == f"{standin.endpoint}/000000000000/flespi-x"

    entries = [{"Id": f"m{i}", "MessageBody": '{"ident":"1"}'} for i in range(9)]
    entries.append({"Id": "big", "MessageBody": "[" + ",".join(["{}"] * 30_000) + "]"})
    started = time.monotonic()
    answer = client.send_message_batch(QueueUrl=url, Entries=entries)
    assert time.monotonic() - started >= LATENCY_MS / 1000
    assert [e["Id"] for e in answer["Successful"]] == [e["Id"] for e in entries]
    assert answer["Failed"] == []
    client.send_message(QueueUrl=url, MessageBody="é" * 10)

    stats = standin.stats()
    assert stats["calls"] == {"GetQueueUrl": 1, "SendMessageBatch": 1, "SendMessage": 1}
    assert stats["entries"] == 11
    assert stats["messages"] == 9 + 30_000 + 1  # a body starting with "[" is packed
    batch_bytes = 9 * 13 + 2 + 30_000 * 2 + 29_999
    assert stats["payload_bytes"] == batch_bytes + 20  # UTF-8 bytes, not characters
    assert stats["billed_requests"] == 2 + 1  # 64 KiB chunks per call
    assert stats["rejected"] == 0


def test_standin_rejects_what_sqs_rejects(standin, client):
    url = client.get_queue_url(QueueName="flespi-x")["QueueUrl"]
    eleven = [{"Id": str(i), "MessageBody": "x"} for i in range(11)]
    with pytest.raises(ClientError) as raised:
        client.send_message_batch(QueueUrl=url, Entries=eleven)
    assert raised.value.response["Error"]["Code"] == (
        "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"
    )
    too_long = [{"Id": str(i), "MessageBody": "x" * 200_000} for i in range(6)]
    with pytest.raises(ClientError, match="BatchRequestTooLong"):
        client.send_message_batch(QueueUrl=url, Entries=too_long)


@pytest.mark.slow
def test_bench_runs_end_to_end(tmp_path):
    output = tmp_path / "latest.md"
    done = subprocess.run(
        [
            sys.executable, "-m", "tools.bench",
            "--requests", "2", "--messages", "50", "--rounds", "1",
            "--latency-ms", "1", "--memory-mb", "0.05", "--no-consumer",
            "--output", str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout
    for column in (
        "msg/s per stream", "× naive", "SQS calls /1k msgs",
        "billed SQS requests /1k msgs", "CPU ms /1k msgs", "import ms",
        "first response ms", "max RSS MB", "tracemalloc peak MB",
    ):
        assert column in table
    rows = [line for line in table.splitlines() if line.startswith(("| naive", "| PACKING"))]
    throughput_rows = rows[:3]
    assert [row.split("|")[1].strip() for row in throughput_rows] == [
        "naive Lambda (seed)", "PACKING=off", "PACKING=on",
    ]
    for row in throughput_rows:
        assert "failed" not in row and row.rstrip("| ").endswith("all"), row
    assert "failed" not in table
    assert output.read_text(encoding="utf-8").strip() == table.strip()
