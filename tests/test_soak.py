"""``make soak`` in miniature: it runs, stops by itself, reports, and its loss
detector can fail."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from conftest import ROOT
from tools.soak import SinkCounts, StreamRun, build_report



def test_a_short_soak_with_faults_loses_nothing(tmp_path):
    report_file = tmp_path / "soak.json"
    result = subprocess.run(
        # Full speed (--rate 0): at the default 10 msg/s a loaded machine could
        # spend the whole 3 s in flespi's 1 s, 2 s backoffs and ack nothing.
        [sys.executable, "-m", "tools.soak", "--duration", "3", "--streams", "2",
         "--batch", "10", "--rate", "0", "--server-error", "0.2", "--entry-failed", "0.2",
         "--reset-after", "0.1", "--entry-sender-fault", "0.05", "--sink-fail", "0.3",
         "--drain-timeout", "20",
         "--report", str(report_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["lost"] == 0 and report["still_queued"] == 0
    assert report["acked"] > 0 and report["delivered"] == report["acked"]
    assert report["sqs_faults"]["server_errors"] + report["sqs_faults"]["entries_failed"] > 0
    assert report["sink_faults"]["rejected_500"] > 0
    assert report["answers"].get("503", 0) > 0 and report["resent_requests"] > 0
    assert "LOST" in result.stdout and "in DLQ" in result.stdout


def _run(offered: int, acked: int) -> StreamRun:
    run = StreamRun(0, offered=[f"0-{n}" for n in range(offered)])
    run.stats.acked = acked
    return run


def test_the_report_counts_an_acked_message_nobody_received_as_lost():
    """The soak's verdict must be able to fail: one acked id missing at the sink."""
    sink = SinkCounts(delivered=Counter({"0-0": 2, "0-1": 1, "0-3": 1}))
    report = build_report([_run(offered=4, acked=3)], sink, dlq_ids=[], queued_ids=[],
                          seconds=1, drained=True, sqs_faults={})
    assert (report.acked, report.delivered, report.lost, report.ok) == (3, 2, 1, False)
    assert report.lost_examples == ["0-2"]
    assert report.duplicated == 1 and report.delivered_unacked == 1


def test_a_message_in_the_dlq_is_reported_there_not_lost():
    sink = SinkCounts(delivered=Counter({"0-0": 1}))
    report = build_report([_run(offered=2, acked=2)], sink, dlq_ids=["0-1"], queued_ids=[],
                          seconds=1, drained=True, sqs_faults={})
    assert (report.in_dlq, report.lost, report.ok) == (1, 0, True)
