"""Coverage-guided fuzzing (libFuzzer via atheris) of the request parser and packer.

Hypothesis (tests/test_fuzz.py) explores shapes we thought of; libFuzzer
mutates bytes toward new branches of the code, including orjson's and
zlib's. The properties checked on every input, for both packing modes and
both queue types:

* ``parse.read_request`` either returns a list of dicts or raises
  ``RequestError`` with a 4xx status - nothing else may escape;
* ``pack.make_entries`` either raises a 400/413 ``RequestError`` or returns
  entries that carry every message exactly once, in order per group, each
  body within SQS's 1 MiB and free of the raw characters SQS refuses.

orjson and zlib are C and not instrumented, so libFuzzer cannot find valid
JSON on its own; an empty corpus directory is seeded with the realistic
samples (plain and gzipped) and a few edge cases to mutate from.

Run: ``.venv/bin/python -m tools.fuzz_atheris -max_total_time=300 CORPUS_DIR``
(any libFuzzer flag works, e.g. ``-runs=100000``).
"""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import orjson

    from chalicelib import pack, parse

_HEADERS = [
    {"content-type": "application/json"},
    {"content-type": "text/plain; charset=utf-8", "content-encoding": "gzip"},
    {"content-type": "application/octet-stream"},
    {"content-type": "application/xml"},
]


def check_entries(messages: list[dict], entries: list[pack.Entry], fifo: bool) -> None:
    """Every message once, per-group order kept, every body acceptable to SQS."""
    landed: dict[str | None, list] = {}
    for entry in entries:
        assert len(entry.body) <= pack.MAX_BYTES, len(entry.body)
        assert b"\xef\xbf\xbe" not in entry.body and b"\xef\xbf\xbf" not in entry.body
        value = orjson.loads(entry.body)
        carried = value if isinstance(value, list) else [value]
        assert len(carried) == entry.count
        landed.setdefault(entry.group, []).extend(carried)
    expected: dict[str | None, list] = {}
    for message in messages:
        expected.setdefault(pack.group_id(message) if fifo else None, []).append(message)
    assert landed == expected


def test_one_input(data: bytes) -> None:
    """One libFuzzer input: a header choice byte, then the body."""
    if not data:
        return
    headers = _HEADERS[data[0] % len(_HEADERS)]
    try:
        messages = parse.read_request(data[1:], headers)
    except parse.RequestError as exc:
        assert 400 <= exc.status < 500 and exc.message, exc
        return
    assert isinstance(messages, list) and all(type(m) is dict for m in messages)
    for packing in (False, True):
        for fifo in (False, True):
            try:
                entries = pack.make_entries(messages, packing, fifo)
            except parse.RequestError as exc:
                assert exc.status in (400, 413), exc
                continue
            check_entries(messages, entries, fifo)


SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "flespi_messages.json"


def seed(corpus: Path) -> None:
    """Give an empty corpus valid requests to start from (first byte: the headers)."""
    if not corpus.is_dir() or any(corpus.iterdir()):
        return
    samples = SAMPLES.read_bytes()
    seeds = {
        "samples": b"\x00" + samples,
        "samples.gz": b"\x01" + gzip.compress(samples),
        "one": b"\x02" + orjson.dumps(orjson.loads(samples)[0]),
        "edges": b'\x00[{"ident":"\\ufffe","x":1e308,"y":[[[{}]]],"z":"\xef\xbf\xbf"}]',
    }
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)


def main() -> None:
    for arg in sys.argv[1:]:
        if not arg.startswith("-") and os.path.isdir(arg):
            seed(Path(arg))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
