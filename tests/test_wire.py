"""The lean wire pieces of the sender: SigV4 signing and the HTTP/1.1 pool.

The signer is checked against botocore's own SigV4Auth byte for byte; the
pool against real loopback servers that answer in each way HTTP allows.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, strategies as st

from chalicelib import http1, sigv4


@given(
    body=st.binary(max_size=2000),
    token=st.one_of(st.none(), st.text("abcXYZ019/+=", min_size=1, max_size=40)),
    url=st.sampled_from(["https://sqs.eu-central-1.amazonaws.com/", "http://127.0.0.1:4566/",
                         "http://localhost:5000/"]),
)
def test_signature_matches_botocore(body, token, url):
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    request = AWSRequest(method="POST", url=url, data=body, headers={
        "Content-Type": sigv4.CONTENT_TYPE, "X-Amz-Target": "AmazonSQS.SendMessageBatch"})
    SigV4Auth(credentials, "sqs", "eu-central-1").add_auth(request)
    pool = http1.Pool(url)
    ours = sigv4.Signer("eu-central-1", "sqs").headers(
        credentials.get_frozen_credentials(), pool.host, pool.path,
        "AmazonSQS.SendMessageBatch", body, date=request.headers["X-Amz-Date"])
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours.get("x-amz-security-token") == request.headers.get("X-Amz-Security-Token")


def test_signing_key_follows_day_and_secret():
    signer = sigv4.Signer("us-east-1", "sqs")
    first = Credentials("A", "secret-1").get_frozen_credentials()
    second = Credentials("A", "secret-2").get_frozen_credentials()
    day1 = signer.headers(first, "h", "/", "t", b"", date="20260101T000000Z")
    assert signer.headers(first, "h", "/", "t", b"", date="20260101T000000Z") == day1
    assert signer.headers(first, "h", "/", "t", b"", date="20260102T000000Z") != day1
    assert signer.headers(second, "h", "/", "t", b"", date="20260101T000000Z") != day1


class Answers(BaseHTTPRequestHandler):
    """Answers by path: length-delimited, chunked, close-delimited, closing."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (body[:3], body[3:]):
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/eof":
            self.send_response(201)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif self.path == "/slow":
            time.sleep(1)
        elif self.path == "/drop":
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path, status", [("/echo", 200), ("/chunked", 200), ("/eof", 201)])
def test_every_body_framing_is_read(server, path, status):
    pool = http1.Pool(server + path)
    for body in (b"hello world", b'{"a":"\xc3\xa9"}' * 5000):
        response = pool.post({"host": pool.host}, body, timeout=5)
        assert (response.status, response.body) == (status, body)


def test_connections_are_kept_and_reused(server):
    pool = http1.Pool(server + "/echo")
    for _ in range(5):
        pool.post({"host": pool.host}, b"x", timeout=5)
    assert len(pool._idle) == 1


def test_a_connection_the_server_closed_is_not_reused(server):
    pool = http1.Pool(server + "/echo")
    pool.post({"host": pool.host}, b"x", timeout=5)
    [idle] = pool._idle
    idle.shutdown(socket.SHUT_RD)  # what a server closing it looks like to select()
    assert pool.post({"host": pool.host}, b"y", timeout=5).body == b"y"
    assert pool._idle[0] is not idle


@pytest.mark.parametrize("path", ["/slow", "/drop"])
def test_timeouts_and_dropped_connections_raise_http_error(server, path):
    pool = http1.Pool(server + path)
    with pytest.raises(http1.HttpError):
        pool.post({"host": pool.host}, b"x", timeout=0.3)
    assert pool._idle == []


def test_refused_connection_raises_http_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(http1.HttpError):
        http1.Pool(f"http://127.0.0.1:{port}/").post({}, b"x", timeout=1)


def test_host_header_omits_default_ports():
    assert http1.Pool("https://sqs.us-east-1.amazonaws.com").host == "sqs.us-east-1.amazonaws.com"
    assert http1.Pool("http://127.0.0.1:80/x").host == "127.0.0.1"
    assert http1.Pool("http://127.0.0.1:5000").host == "127.0.0.1:5000"
