"""A kept-alive HTTP/1.1 client for small JSON POSTs, one pool per endpoint.

Why not urllib3 (what botocore uses): ``make bench`` measured 0.44 ms of CPU
per SendMessageBatch call through urllib3 against 0.20 ms with this client,
mostly http.client's header handling and its email-based response parser.
A 1000-message flespi request makes 100 calls on Lambda's single GIL, so
that difference is the throughput ceiling. What we need is narrow: POST a
body, read a status, headers and a Content-Length or chunked body, keep the
connection for the next call. TLS uses the standard library's ``ssl`` with
botocore's CA bundle, so certificate checking is the same as boto3's.
"""
from __future__ import annotations

import select
import socket
import ssl
import threading
from typing import Callable
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """The exchange broke (refused, reset, timed out, garbled): retryable."""


class Response:
    """Status, lower-cased headers and the whole body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Pool:
    """Idle connections to one endpoint, reused across calls and invocations."""

    def __init__(self, url: str, ca_bundle: str | None = None) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.address = (parts.hostname or "", parts.port or (443 if self.tls else 80))
        default_port = parts.port is None or parts.port == (443 if self.tls else 80)
        #: The Host header, as SigV4 signs it: no port when it is the default.
        self.host = self.address[0] if default_port else f"{self.address[0]}:{parts.port}"
        self.path = parts.path or "/"
        self._tls = ssl.create_default_context(cafile=ca_bundle) if self.tls else None
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def post(
        self,
        headers: dict[str, str],
        body: bytes,
        timeout: float,
        while_waiting: Callable[[], None] | None = None,
    ) -> Response:
        """One request/response exchange; raises HttpError if it breaks.

        ``while_waiting`` runs once the request is sent, before the answer is
        read: the caller's chance to do other work during the round trip.
        """
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {self.path} HTTP/1.1\r\n{head}content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        connection = None
        try:
            connection = self._acquire(timeout)
            connection.settimeout(timeout)
            connection.sendall(request)
            if while_waiting is not None:
                while_waiting()
            response, keep = _read_response(connection)
        except (OSError, ValueError) as exc:
            if connection is not None:
                connection.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        if keep:
            with self._lock:
                self._idle.append(connection)
        else:
            connection.close()
        return response

    def _acquire(self, timeout: float) -> socket.socket:
        """An idle connection the server has not closed, or a new one."""
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._connect(timeout)
            # Readable while idle means the server closed it (or sent junk).
            if not select.select([connection], [], [], 0)[0]:
                return connection
            connection.close()

    def _connect(self, timeout: float) -> socket.socket:
        connection = socket.create_connection(self.address, timeout=timeout)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            connection = self._tls.wrap_socket(connection, server_hostname=self.address[0])
        return connection


def _read_response(connection: socket.socket) -> tuple[Response, bool]:
    """Read one response; also say whether the connection may be reused."""
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        _receive(connection, buffer)
        if len(buffer) > _MAX_HEAD:
            raise ValueError("response head too large")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    version, status, *_ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(connection, buffer)
    elif "content-length" in headers:
        body = _read_exactly(connection, buffer, int(headers["content-length"]))
    else:  # delimited by the server closing the connection
        while _receive(connection, buffer, eof_ok=True):
            pass
        body, keep = bytes(buffer), False
    return Response(int(status), headers, body), keep


def _receive(connection: socket.socket, buffer: bytearray, eof_ok: bool = False) -> bool:
    chunk = connection.recv(65536)
    if not chunk and not eof_ok:
        raise ConnectionResetError("connection closed mid-response")
    buffer += chunk
    return bool(chunk)


def _read_exactly(connection: socket.socket, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        _receive(connection, buffer)
    return bytes(buffer[:size])


def _read_chunked(connection: socket.socket, buffer: bytearray) -> bytes:
    body = bytearray()
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            _receive(connection, buffer)
        size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
        del buffer[: end + 2]
        chunk = _read_exactly(connection, buffer, size + 2)  # data and its CRLF
        del buffer[: size + 2]
        if size == 0:  # no trailers are expected from SQS
            return bytes(body)
        body += chunk[:size]
