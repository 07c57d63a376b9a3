"""A short run of benchmarks/recovery.py (issue 21): subscribers over two servers recover
across resets, a server kill and its restart, with no event lost, duplicated or out of order."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

RECOVERY = Path(__file__).resolve().parent.parent / "benchmarks" / "recovery.py"


def _module():
    spec = importlib.util.spec_from_file_location("juggler_recovery_bench", RECOVERY)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("juggler_recovery_bench", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
def test_a_short_recovery_storm(redis_server, tmp_path):
    del redis_server  # (the benchmark starts its own; the fixture fails under CI without redis-server)
    bench = _module()
    args = bench.parse(["--subscribers", "12", "--rate", "100", "--duration", "4", "--reset-every", "0.8",
                        "--kill-at", "2", "--restart-after", "0.5", "--catchup", "300", "--catchup-runs", "2"])  # fmt: skip
    report = bench.Bench(args, str(tmp_path), log=lambda line: None).run()
    assert report["events published"] == 400
    assert (report["lost"], report["duplicated"], report["out of order"]) == (0, 0, 0), report
    assert report["recovered false"] == 0 and report["reconnects"] >= 12, report
    assert report["server killed and restarted"], report
    assert len(report["catch-up ms"]) == 2
