"""Turn a flespi request body into validated messages, or say exactly why not.

Everything that can make a request fail on its content is checked here,
before a single byte goes to SQS: a rejected request sends nothing. Errors
carry the HTTP status the contract gives them and a message that names the
offending message index (or byte offset, for bodies that are not JSON).
"""
from __future__ import annotations

import zlib
from typing import Mapping

import orjson

#: Media types flespi may use; its own is undocumented, so all three are taken.
ACCEPTED_MEDIA_TYPES = ("application/json", "text/plain", "application/octet-stream")
#: A gzip body may inflate to at most this much. Lambda receives at most 6 MB;
#: flespi JSON compresses about tenfold, so 32 MiB leaves room for any honest
#: batch while a gzip bomb is refused after inflating no more than this.
MAX_INFLATED_BYTES = 32 * 1024 * 1024


class RequestError(Exception):
    """A request we refuse; ``status`` is the HTTP status the contract gives it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_content_type(content_type: str | None) -> None:
    """Refuse media types flespi never sends (415); a missing header is JSON."""
    media_type = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise RequestError(
            415,
            f"Content-Type {media_type!r} is not accepted; "
            f"send one of {', '.join(ACCEPTED_MEDIA_TYPES)}",
        )


def inflate(body: bytes, content_encoding: str | None) -> bytes:
    """Undo ``Content-Encoding: gzip`` without ever inflating past the limit."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise RequestError(415, f"Content-Encoding {encoding!r} is not supported; use gzip")
    # A gzip body may hold several members (RFC 1952 2.2; ``cat a.gz b.gz``):
    # each is inflated in turn, and the limit counts them all. Anything after
    # the last member but zero padding is refused, never silently dropped.
    parts: list[bytes] = []
    room = MAX_INFLATED_BYTES
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:  # one byte more than the room left shows the limit is passed
            part = inflater.decompress(rest, room + 1)
        except zlib.error as exc:
            raise RequestError(400, f"body is not valid gzip: {exc}") from None
        room -= len(part)
        parts.append(part)
        if room < 0:
            raise RequestError(
                413, f"gzip body inflates beyond {MAX_INFLATED_BYTES:,} bytes; send smaller batches"
            )
        if not inflater.eof:
            raise RequestError(400, "body is not valid gzip: the stream is truncated")
        rest = inflater.unused_data
        if not rest.strip(b"\0"):
            return b"".join(parts) if len(parts) > 1 else parts[0]
        if not rest.startswith(b"\x1f\x8b"):
            raise RequestError(400, "body is not valid gzip: data after the end of the stream")


def load_messages(body: bytes) -> list[dict]:
    """Parse a JSON array of objects (or one object) into a list of messages.

    orjson is strict where the contract wants strictness: it rejects invalid
    UTF-8, lone surrogates (raw or escaped), NaN/Infinity, numbers that
    overflow a double, and nesting deeper than 1024 levels.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, _syntax_error(body, exc)) from None
    if isinstance(document, dict):
        return [document]
    if not isinstance(document, list):
        raise RequestError(
            400, f"body must be a JSON array of objects, not {_json_type(document)}"
        )
    for index, message in enumerate(document):
        if type(message) is not dict:
            raise RequestError(
                400, f"message {index} is {_json_type(message)}, not a JSON object"
            )
    return document


def read_request(body: bytes, headers: Mapping[str, str]) -> list[dict]:
    """The whole validation chain for one request, in the contract's order."""
    check_content_type(headers.get("content-type"))
    return load_messages(inflate(body, headers.get("content-encoding")))


def _syntax_error(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """Say what is wrong and where; orjson reports bad UTF-8 confusingly."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"body is not valid UTF-8: byte {bad.start} ({body[bad.start]:#04x})"
    if not body.strip():
        return "body is empty; send a JSON array of flespi messages"
    return f"body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"


def _json_type(value: object) -> str:
    """Name a parsed value the way a JSON user would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
