"""Shared fixtures: a real moto SQS server on a free loopback port.

Every test that touches SQS talks to it over HTTP through ``AWS_ENDPOINT_URL``,
exactly as the code would talk to AWS.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# No test may reach AWS: fake credentials and a fixed region, set before any
# botocore session is made.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)
os.environ.setdefault("QUEUE_NAME", "flespi-test")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """One moto server for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture()
def sqs(moto_server):
    """A boto3 SQS client on the moto server."""
    import boto3

    return boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture()
def samples() -> list[dict]:
    """The realistic flespi messages of samples/ (a copy of ../shared/samples)."""
    import json

    return json.loads((ROOT / "samples" / "flespi_messages.json").read_text())
