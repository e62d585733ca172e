"""``make simulate``: behave like one flespi HTTP stream.

A flespi stream is single-threaded: it sends one batch, waits for the answer,
and only a 200 takes the batch out of its buffer; anything else (or a
timeout) makes it send the same batch again later. This simulator does the
same, with messages made from the realistic samples: N devices, each with
its own ident and device.id, moving along a random walk, timestamps now.

Progress (sent, acked, rate, retries) is redrawn on stderr; the summary is
printed on stdout at the end. flespi does not document its retry schedule:
we double the pause after each failure, from --backoff up to --max-backoff.
A 403 ends the run (exit 2): a wrong key never heals, and flespi would retry
it forever.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

import urllib3

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "flespi_messages.json"
#: A device's first ident; flespi idents are usually 15-digit IMEIs.
IDENT_BASE = 860_000_000_000_000
#: Redraw the progress line at most this often (seconds).
PROGRESS_EVERY = 0.25


class Forbidden(Exception):
    """The receiver refused our API key."""


@dataclass
class Device:
    """One tracker: a sample message as template, a position that wanders."""

    number: int
    template: dict
    latitude: float
    longitude: float
    heading: float

    def message(self, now: float, rng: random.Random) -> dict:
        """The device's next message: the template with identity, time and position updated."""
        message = dict(self.template)
        message["ident"] = str(IDENT_BASE + self.number)
        message["timestamp"] = round(now, 3)
        message["server.timestamp"] = round(now + rng.uniform(0.05, 1.5), 6)
        if "device.id" in message:
            message["device.id"] = 1_000_000 + self.number
        if "position.latitude" in message:
            self.heading = (self.heading + rng.uniform(-20, 20)) % 360
            speed = rng.randint(0, 90)
            step = speed / 3600 / 111  # degrees travelled in about a second
            self.latitude += step * math.cos(math.radians(self.heading))
            self.longitude += step * math.sin(math.radians(self.heading))
            message.update({
                "position.latitude": round(self.latitude, 6),
                "position.longitude": round(self.longitude, 6),
                "position.direction": round(self.heading),
                "position.speed": speed,
            })
        return message


def fleet(samples: list[dict], devices: int, rng: random.Random) -> list[Device]:
    """``devices`` trackers, templates taken from the samples in turn, spread around them."""
    tracked = []
    for number in range(devices):
        template = samples[number % len(samples)]
        tracked.append(Device(
            number=number,
            template=template,
            latitude=template.get("position.latitude", 0) + rng.uniform(-0.5, 0.5),
            longitude=template.get("position.longitude", 0) + rng.uniform(-0.5, 0.5),
            heading=rng.uniform(0, 360),
        ))
    return tracked


def batches(devices: list[Device], size: int, rng: random.Random) -> Iterator[list[dict]]:
    """An endless stream of batches; devices take turns, as in flespi's buffer."""
    turn = 0
    while True:
        now = time.time()
        batch = []
        for _ in range(size):
            batch.append(devices[turn % len(devices)].message(now, rng))
            turn += 1
        yield batch


@dataclass
class Stats:
    """What the run did; the progress line and the summary read it."""

    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    retries: int = 0
    sent: int = 0
    acked: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, outcome: str, messages: int, latency_ms: float) -> None:
        self.requests += 1
        self.sent += messages
        self.statuses[outcome] = self.statuses.get(outcome, 0) + 1
        self.latencies_ms.append(latency_ms)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return self.acked / self.elapsed if self.elapsed > 0 else 0.0

    def progress(self) -> str:
        return (f"sent {self.sent:,} msgs  acked {self.acked:,}  {self.rate():,.0f} msg/s  "
                f"requests {self.requests:,}  retries {self.retries:,}")

    def summary(self) -> str:
        lines = [f"acked {self.acked:,} messages in {self.elapsed:.1f} s = {self.rate():,.0f} msg/s",
                 f"requests {self.requests:,} (retries {self.retries:,}), messages sent "
                 f"{self.sent:,}; answers {json.dumps(self.statuses, sort_keys=True)}"]
        if self.latencies_ms:
            ordered = sorted(self.latencies_ms)
            p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
            lines.append(f"latency ms: median {statistics.median(ordered):.0f}, "
                         f"p95 {p95:.0f}, max {ordered[-1]:.0f}")
        return "\n".join(lines)


class Progress:
    """One line on stderr, redrawn in place on a terminal, printed every second otherwise."""

    def __init__(self, stats: Stats, stream: TextIO = sys.stderr) -> None:
        self._stats = stats
        self._stream = stream
        self._tty = stream.isatty()
        self._every = PROGRESS_EVERY if self._tty else 1.0
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._every:
            return
        self._last = now
        line = self._stats.progress()
        self._stream.write(f"\r{line}\x1b[K" if self._tty else line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        self.update(force=True)
        if self._tty:
            self._stream.write("\n")


@dataclass(frozen=True)
class Stream:
    """Where and how to send: flespi's stream settings."""

    url: str
    headers: dict[str, str]
    timeout: float
    backoff: float
    max_backoff: float


def deliver(http: urllib3.PoolManager, stream: Stream, body: bytes, messages: int,
            stats: Stats, progress: Progress, deadline: float) -> bool:
    """Send one batch until it gets a 200, as flespi does; False if the run ran out of time."""
    pause = stream.backoff
    while True:
        started = time.perf_counter()
        try:
            response = http.request("POST", stream.url, body=body, headers=stream.headers,
                                    timeout=stream.timeout, retries=False)
            outcome = str(response.status)
        except urllib3.exceptions.HTTPError as exc:
            outcome = type(exc).__name__
        stats.record(outcome, messages, (time.perf_counter() - started) * 1000)
        if outcome == "200":
            stats.acked += messages
            progress.update()
            return True
        if outcome == "403":
            raise Forbidden(response.data.decode(errors="replace"))
        progress.update()
        if time.monotonic() + pause > deadline:
            return False
        time.sleep(pause)
        stats.retries += 1
        pause = min(pause * 2, stream.max_backoff)


def run(stream: Stream, batch_source: Iterator[list[dict]], count: int, rate: float,
        duration: float, stats: Stats, progress: Progress) -> None:
    """Send batches one at a time until ``count`` messages are acked or ``duration`` is over."""
    deadline = time.monotonic() + duration if duration else float("inf")
    http = urllib3.PoolManager(maxsize=1)
    for batch in batch_source:
        if count:
            batch = batch[: count - stats.acked]
        body = json.dumps(batch, ensure_ascii=False, separators=(",", ":")).encode()
        if not deliver(http, stream, body, len(batch), stats, progress, deadline):
            return
        if (count and stats.acked >= count) or time.monotonic() >= deadline:
            return
        if rate:
            # Hold the average at ``rate``: wait until the acked messages are due.
            due = stats.started + stats.acked / rate
            time.sleep(max(0.0, min(due, deadline) - time.monotonic()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    port = os.environ.get("PORT", "8000")
    parser = argparse.ArgumentParser(prog="python -m tools.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("URL", f"http://127.0.0.1:{port}/flespi"),
                        help="where to POST (default: $URL, else make run's http://127.0.0.1:$PORT/flespi)")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", ""),
                        help="sent as x-api-key (default: $API_KEY)")
    parser.add_argument("--devices", type=int, default=10, help="trackers in the stream (10)")
    parser.add_argument("--batch", type=int, default=100,
                        help="messages per request, flespi's limit_messages (100)")
    parser.add_argument("--rate", type=float, default=0,
                        help="target messages per second; 0: as fast as answers come (0)")
    parser.add_argument("--count", type=int, default=1000,
                        help="stop after this many acked messages; 0: no limit (1000)")
    parser.add_argument("--duration", type=float, default=0,
                        help="stop after this many seconds; 0: no limit (0)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for an answer (30)")
    parser.add_argument("--backoff", type=float, default=1, help="first pause after a failure, s (1)")
    parser.add_argument("--max-backoff", type=float, default=60, help="longest pause, s (60)")
    parser.add_argument("--samples", type=Path, default=SAMPLES, help="JSON array of messages")
    parser.add_argument("--seed", type=int, help="make the generated messages repeatable")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.batch < 1:
        parser.error("--devices and --batch must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one simulated stream; exit 0 when done, 2 when the key is refused."""
    args = parse_args(argv)
    rng = random.Random(args.seed)
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["x-api-key"] = args.api_key
    stream = Stream(args.url, headers, args.timeout, args.backoff, args.max_backoff)
    devices = fleet(json.loads(args.samples.read_text()), args.devices, rng)
    stats = Stats()
    progress = Progress(stats)
    sys.stderr.write(f"flespi stream -> {args.url}: {args.devices} devices, {args.batch} "
                     f"messages per request, {'%g msg/s' % args.rate if args.rate else 'full speed'}\n")
    code = 0
    try:
        run(stream, batches(devices, args.batch, rng), args.count, args.rate, args.duration,
            stats, progress)
    except KeyboardInterrupt:
        code = 130
    except Forbidden as exc:
        sys.stderr.write(f"\n403 from {args.url}: {exc}; check --api-key / $API_KEY\n")
        code = 2
    progress.finish()
    print(stats.summary())
    return code


if __name__ == "__main__":
    sys.exit(main())
