"""Property tests of the packer and the batch planner: limits, coverage, order."""
from __future__ import annotations

import json

import orjson

from hypothesis import given, settings, strategies as st

from chalicelib import pack

# Message sizes from tiny to SQS-sized, skewed towards the realistic 0.1-2 KB.
sizes = st.one_of(
    st.integers(min_value=10, max_value=2_000),
    st.integers(min_value=2_000, max_value=pack.MAX_BYTES - 100),
)
messages = st.lists(
    st.builds(
        lambda n, size, ident: {"ident": f"dev{ident}", "n": n, "pad": "x" * size},
        st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what orjson parses
        sizes,
        st.integers(min_value=0, max_value=5),
    ),
    max_size=40,
)
small_messages = st.lists(
    st.fixed_dictionaries(
        {"ident": st.sampled_from(["a", "b", "c", "Грузовик", "x" * 200]),
         "text": st.text(max_size=30)}
    ),
    max_size=300,
)


def _unpack(entries: list[pack.Entry]) -> list[dict]:
    out: list[dict] = []
    for entry in entries:
        body = json.loads(entry.body)
        out.extend(body if isinstance(body, list) else [body])
    return out


@settings(max_examples=60, deadline=None)
@given(messages, st.booleans(), st.booleans())
def test_entries_hold_every_message_once_within_limits(batch, packing, fifo):
    entries = pack.make_entries(batch, packing, fifo)
    assert all(len(entry.body) <= pack.MAX_BYTES for entry in entries)
    assert sum(entry.count for entry in entries) == len(batch)
    unpacked = _unpack(entries)
    if fifo:  # grouped per device, each device's messages in order
        for ident in {m["ident"] for m in batch}:
            assert [m for m in unpacked if m["ident"] == ident] == [
                m for m in batch if m["ident"] == ident
            ]
        assert all(entry.group for entry in entries)
    else:
        assert unpacked == batch


@settings(max_examples=60, deadline=None)
@given(small_messages, st.booleans())
def test_packing_uses_few_messages(batch, fifo):
    entries = pack.make_entries(batch, True, fifo)
    groups = {pack.group_id(m) for m in batch} if fifo else {None}
    assert len(entries) == (len(groups) if batch else 0)


@settings(max_examples=80, deadline=None)
@given(messages, st.booleans(), st.integers(min_value=1, max_value=8))
def test_planned_calls_respect_sqs_limits_and_keep_order(batch, fifo, lanes):
    entries = pack.make_entries(batch, False, fifo)
    planned = pack.plan_lanes(entries, lanes)
    calls = [call for lane in planned for call in lane]
    for call in calls:
        assert 1 <= len(call) <= pack.MAX_ENTRIES
        assert sum(len(entry.body) for entry in call) <= pack.MAX_BYTES
    flat = [entry for call in calls for entry in call]
    assert sorted(map(id, flat)) == sorted(map(id, entries))  # each exactly once
    if not fifo:
        assert flat == entries
        return
    assert len(planned) <= lanes
    for lane in planned:  # a device lives in one lane, in order
        lane_entries = [entry for call in lane for entry in call]
        for group in {entry.group for entry in lane_entries}:
            assert [e for e in lane_entries if e.group == group] == [
                e for e in entries if e.group == group
            ]
            assert all(
                group not in {e.group for call in other for e in call}
                for other in planned if other is not lane
            )


@given(st.text())
def test_bodies_never_hold_what_sqs_refuses(text):
    [body] = pack.encode([{"text": text}])
    decoded = body.decode("utf-8")
    assert not any(ch in decoded for ch in "\ufffe\uffff")
    assert not any(ord(ch) < 0x20 for ch in decoded)
    assert json.loads(decoded) == {"text": text}


def test_group_ids_are_what_sqs_accepts():
    assert pack.group_id({"ident": "352093081429150"}) == "352093081429150"
    assert pack.group_id({"ident": 42}) == "42"
    odd = pack.group_id({"ident": "Грузовик 7"})
    assert odd.startswith("sha256-") and len(odd) <= 128
    assert pack.group_id({"ident": "Грузовик 7"}) == odd  # stable per device
    assert pack.group_id({}) == "no-ident"


def test_billing_counts_started_64k_chunks():
    entry = pack.Entry(b"x" * 65_536, 1)
    assert pack.billed_requests([entry]) == 1
    assert pack.billed_requests([entry, pack.Entry(b"x", 1)]) == 2


@given(st.integers(min_value=pack.MAX_BYTES - 12, max_value=pack.MAX_BYTES), st.booleans(),
       st.integers(min_value=0, max_value=3))
@settings(max_examples=30, deadline=None)
def test_messages_at_the_size_limit_still_make_sendable_entries(size, fifo, neighbours):
    frame = len(orjson.dumps({"ident": "a", "pad": ""}))
    big = {"ident": "a", "pad": "x" * (size - frame)}
    batch = [{"ident": "a", "n": n} for n in range(neighbours)] + [big]
    entries = pack.make_entries(batch, True, fifo)
    assert all(len(entry.body) <= pack.MAX_BYTES for entry in entries)
    assert _unpack(entries) == batch
    for call in pack.plan_batches(entries):
        assert sum(len(entry.body) for entry in call) <= pack.MAX_BYTES
