"""``make bench``: per-stream ingest throughput against the seed's naive Lambda, same run.

A flespi stream sends one request at a time, so per-stream throughput is
messages per request over request latency. Each configuration (the naive
Lambda, our app with ``PACKING=off`` and ``on``, optionally several
``SEND_CONCURRENCY`` values) runs in a fresh interpreter (``tools.bench_worker``)
because ``app.py`` reads its settings at import, which also yields honest
cold-start and memory numbers. Configurations alternate (naive, off, on,
naive, ...) for ``--rounds`` rounds so drifting machine load hits all alike,
and the table shows medians. SQS is ``tools.sqs_standin`` in its own process,
answering every call after a fixed latency.

Usage: ``python -m tools.bench [--requests 10] [--rounds 3] [--latency-ms 12]
[--concurrency 16,32,64] [--memory-mb 5] [--no-consumer]``. Progress goes to
stderr, the markdown report to stdout and ``bench-results/latest.md``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tools.sqs_standin import StandIn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "latest.md"
QUEUE_NAME = "flespi-bench"
WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class Config:
    """One row of the table: what runs and with which environment."""

    label: str
    target: str  # a key of tools.bench_worker.TARGETS
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class Runs:
    """Every run of one configuration; the first error stops its later rounds."""

    throughput: list[dict] = field(default_factory=list)
    memory: dict | None = None
    error: str | None = None


def configurations(concurrency: list[int]) -> list[Config]:
    """The naive Lambda, then our app packed off and on for each concurrency asked."""
    configs = [Config("naive Lambda (seed)", "naive")]
    for limit in concurrency or [None]:
        for packing in ("off", "on"):
            env = [("PACKING", packing)]
            label = f"PACKING={packing}"
            if limit is not None:
                env.append(("SEND_CONCURRENCY", str(limit)))
                label += f", SEND_CONCURRENCY={limit}"
            configs.append(Config(label, "app", tuple(env)))
    return configs


def worker_env(config: Config, endpoint: str) -> dict[str, str]:
    """A clean AWS environment aimed at the stand-in: no profile, config file or real keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="eu-central-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        QUEUE_NAME=QUEUE_NAME,
    )
    env.update(config.env)
    return env


def run_worker(config: Config, spec: dict, endpoint: str) -> dict:
    """One fresh interpreter doing one measurement; its JSON result (or an ``error``)."""
    spec = {**spec, "endpoint": endpoint}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tools.bench_worker", config.target, json.dumps(spec)],
            cwd=ROOT,
            env=worker_env(config, endpoint),
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {WORKER_TIMEOUT_S} s"}
    try:
        return json.loads(done.stdout)
    except ValueError:
        tail = done.stderr.strip().splitlines()[-5:]
        return {"error": f"worker exit {done.returncode}: " + " | ".join(tail)}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rate(run: dict) -> float:
    """Messages per second of one stream: what flespi would see."""
    return run["messages"] / sum(run["walls"])


def measure(args: argparse.Namespace, configs: list[Config], endpoint: str) -> dict[Config, Runs]:
    """All throughput rounds, alternating configurations, then one memory run each."""
    runs = {config: Runs() for config in configs}
    spec = {"requests": args.requests, "messages": args.messages, "seed": args.seed}
    for round_no in range(1, args.rounds + 1):
        for config in configs:
            if runs[config].error:
                continue
            result = run_worker(config, {**spec, "mode": "throughput"}, endpoint)
            if "error" in result:
                runs[config].error = result["error"]
                progress(f"round {round_no}/{args.rounds} {config.label}: FAILED {result['error']}")
                continue
            runs[config].throughput.append(result)
            progress(
                f"round {round_no}/{args.rounds} {config.label}: {rate(result):,.0f} msg/s, "
                f"{result['cpu_s'] * 1000 / result['messages'] * 1000:,.0f} CPU ms/1k msgs"
            )
    if args.memory_mb > 0:
        memory_spec = {**spec, "mode": "memory", "memory_bytes": args.memory_mb * 1_000_000}
        for config in configs:
            if runs[config].error:
                continue
            progress(f"memory, {args.memory_mb:g} MB request: {config.label} ...")
            runs[config].memory = run_worker(config, memory_spec, endpoint)
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def applied_latency(sqs: dict) -> float:
    """Mean seconds the stand-in really waited per call (at least the latency asked)."""
    return sqs["answer_wait_s"] / max(1, sqs["answered"])


def per_thousand(runs: list[dict], value) -> float:
    """Median over runs of ``value(run)`` per 1,000 flespi messages."""
    return median([value(run) * 1000 / run["messages"] for run in runs])


def throughput_table(configs: list[Config], runs: dict[Config, Runs]) -> list[str]:
    naive = median([rate(run) for run in runs[configs[0]].throughput])
    lines = [
        "| configuration | msg/s per stream (min–max) | × naive | ms/request "
        "| SQS calls /1k msgs | billed SQS requests /1k msgs | CPU ms /1k msgs "
        "| max calls in flight | SQS latency applied ms | delivered |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for config in configs:
        done = runs[config].throughput
        if not done:
            lines.append(f"| {config.label} | failed: {runs[config].error} ||||||||||")
            continue
        rates = [rate(run) for run in done]
        sent = sum(run["messages"] for run in done)
        delivered = sum(run["sqs"]["messages"] for run in done)
        lines.append(
            f"| {config.label} | {median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) "
            f"| {median(rates) / naive:.1f}× "
            f"| {median([1000 * statistics.mean(run['walls']) for run in done]):,.1f} "
            f"| {per_thousand(done, lambda r: sum(r['sqs']['calls'].values())):,.1f} "
            f"| {per_thousand(done, lambda r: r['sqs']['billed_requests']):,.1f} "
            f"| {per_thousand(done, lambda r: r['cpu_s'] * 1000):,.0f} "
            f"| {max(run['sqs']['max_in_flight'] for run in done)} "
            f"| {median([1000 * applied_latency(run['sqs']) for run in done]):.2f} "
            f"| {'all' if delivered == sent else f'{delivered:,} of {sent:,}'} |"
        )
    return lines


def memory_cells(memory: dict | None) -> list[str]:
    """Max RSS and tracemalloc peak of one memory run, or why there are none."""
    if memory is None:
        return ["not run"] * 2
    if "error" in memory:
        return [f"failed: {memory['error']}"] * 2
    return [f"{memory['max_rss_mb']:,.0f}", f"{memory['traced_peak_mb']:,.0f}"]


def cold_memory_table(configs: list[Config], runs: dict[Config, Runs], messages: int) -> list[str]:
    """Cold start of every configuration; memory columns when memory was measured."""
    measured = [r.memory for r in runs.values() if r.memory is not None]
    sizes = [memory["request_bytes"] for memory in measured if "request_bytes" in memory]
    lines = [
        f"Cold start: a fresh interpreter imports the handler, then answers a first request "
        f"of {messages} messages (first response = import + that request)."
    ]
    header, rule = "| configuration | import ms | first response ms |", "|---|--:|--:|"
    if measured:
        size = f"{max(sizes) / 1e6:.1f} MB" if sizes else "large"
        lines[0] += (
            f" Memory, one {size} request: the process's max RSS (Lambda's Max Memory Used), "
            "and tracemalloc's peak while handling a second one."
        )
        header += " max RSS MB | tracemalloc peak MB |"
        rule += "--:|--:|"
    lines += ["", header, rule]
    for config in configs:
        done = runs[config].throughput
        if not done:
            continue
        cells = [
            config.label,
            f"{median([run['import_ms'] for run in done]):,.0f}",
            f"{median([run['first_response_ms'] for run in done]):,.0f}",
        ]
        if measured:
            cells += memory_cells(runs[config].memory)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def git_revision() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def report(
    argv: list[str], args: argparse.Namespace, configs: list[Config], runs: dict[Config, Runs]
) -> str:
    """The whole markdown report: setup, throughput table, cold start and memory."""
    bodies = [run["body_bytes"] / run["messages"] for r in runs.values() for run in r.throughput]
    lines = [
        "## Ingest benchmark",
        "",
        f"`{' '.join(['python -m tools.bench', *argv])}` — "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, git {git_revision()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs.",
        f"One flespi stream, {args.requests} requests of {args.messages} messages "
        f"(~{median(bodies):,.0f} B each) per run after one cold request, "
        f"{args.rounds} alternating rounds, medians; SQS stand-in latency {args.latency_ms:g} ms.",
        "",
        *throughput_table(configs, runs),
        "",
    ]
    lines += [*cold_memory_table(configs, runs, args.messages), ""]
    return "\n".join(lines)


def consumer_section(enabled: bool) -> str:
    """``tools.bench_consumer``'s own report, when that benchmark exists and is wanted."""
    if not enabled:
        return "Consumer benchmark: skipped (--no-consumer).\n"
    if importlib.util.find_spec("tools.bench_consumer") is None:
        return "Consumer benchmark: skipped (tools/bench_consumer.py does not exist yet).\n"
    progress("consumer benchmark: python -m tools.bench_consumer ...")
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench_consumer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-5:])
        return f"Consumer benchmark failed (exit {done.returncode}): {tail}\n"
    return "## Consumer benchmark\n\n`python -m tools.bench_consumer`\n\n" + done.stdout


def concurrency_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10, help="timed requests per run")
    parser.add_argument("--messages", type=int, default=1000, help="flespi messages per request")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per configuration")
    parser.add_argument("--latency-ms", type=float, default=12.0, help="SQS stand-in latency")
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=[],
        help="comma-separated SEND_CONCURRENCY values (default: the app's own default)",
    )
    parser.add_argument(
        "--memory-mb", type=float, default=5.0, help="request size for memory; 0 skips"
    )
    parser.add_argument("--seed", type=int, default=1, help="load generator seed")
    parser.add_argument(
        "--consumer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run tools.bench_consumer if it exists",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the report is written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configs = configurations(args.concurrency)
    with StandIn(args.latency_ms) as standin:
        progress(f"SQS stand-in at {standin.endpoint}, latency {args.latency_ms:g} ms")
        runs = measure(args, configs, standin.endpoint)
    text = report(argv, args, configs, runs) + "\n" + consumer_section(args.consumer)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    progress(f"written to {args.output}")


if __name__ == "__main__":
    main()
