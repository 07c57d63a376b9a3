"""A short run of benchmarks/soak.py: calls and pub-sub while redis restarts and callee
processes are killed; every call ends exactly once, no event comes twice, and redis is left
with no juggler key."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import SCALE

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("juggler_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("juggler_soak", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.realredis
@pytest.mark.timeout(300)
@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_a_short_soak_with_redis_restarts_and_killed_callees(redis_server, tmp_path, resp3):
    del redis_server  # (the soak starts its own; the fixture fails under CI without redis-server)
    soak = _soak_module()
    argv = ["--calls", "1500", "--connections", "3", "--in-flight", "4", "--min-timeout", str(0.3 * SCALE),
            "--max-timeout", str(1.0 * SCALE), "--publishers", "1", "--subscribers", "2", "--callees", "2",
            "--workers", "4", "--redis-every", "1.0", "--kill-every", "0.8", "--logdir", str(tmp_path)]  # fmt: skip
    if resp3:
        argv.append("--resp3")
    report = soak.Soak(soak.parse(argv), log=lambda line: None).run()
    assert report["ok"], report
    assert report["outcomes"].get("result", 0) > 0 and report["events received"] > 0
    assert report["faults"].get("callees killed", 0) >= 1 and report["faults"].get("redis restarts", 0) >= 1
