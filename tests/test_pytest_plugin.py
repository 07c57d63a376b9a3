"""juggler's pytest plugin (juggler/pytest_plugin.py): its fixtures, used here as a user's test
suite uses them, and a user's test file run by a plain ``pytest`` in a subprocess, with the
plugin loaded as docs/testing.rst says (and not loaded where a suite does not ask for it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import redis

from juggler import CallExpired, Client, RemoteError

from .conftest import T
from .test_cli import ROOT, env

__all__: list[str] = []


def add(args):
    return args[0] + args[1]


def test_callee_serves_what_the_test_registers_on_it(juggler_callee, juggler_client):
    juggler_callee.register("math.add", add)
    assert juggler_client.call("math.add", [2, 3], timeout=T(5)) == 5
    # registered later: served too, and the first one still is
    juggler_callee.register("math.neg", lambda x: -x)
    assert juggler_client.call("math.neg", 4, timeout=T(5)) == -4
    assert juggler_client.call("math.add", [1, 1], timeout=T(5)) == 2
    assert juggler_callee.uris == ["math.add", "math.neg"]
    with pytest.raises(RemoteError, match="^TypeError: "):
        juggler_client.call("math.add", 5, timeout=T(5))  # 5[0]
    assert juggler_callee.stats.errors == 1


def test_a_bad_registration_leaves_the_running_callee_alone(juggler_callee, juggler_client):
    juggler_callee.register("math.add", add)
    with pytest.raises(TypeError):
        juggler_callee.register("math.bad", "not callable")
    assert juggler_client.call("math.add", [2, 3], timeout=T(5)) == 5


def test_calls_wait_in_redis_until_a_function_is_registered(juggler_callee, juggler_client, juggler_redis):
    fut = juggler_client.call_async("late.echo", "x", timeout=T(10))
    with pytest.raises(CallExpired):
        juggler_client.call("late.nobody", 1, timeout=0.05)
    juggler_callee.register("late.echo", lambda a: a)
    assert fut.result(T(10)) == "x"


def test_server_and_client_fixtures_do_pubsub(juggler_server, juggler_client):
    assert juggler_server.url.startswith("ws://127.0.0.1:")
    sub = juggler_client.sub("news")
    with Client.connect(juggler_server.url) as other:
        other.pub("news", {"n": 1})
    assert sub.get(T(5)).args == {"n": 1}


def test_juggler_redis_is_fresh_for_each_test(juggler_redis):
    assert not list(juggler_redis.scan_iter(match="juggler:*"))
    juggler_redis.set("juggler:left-behind", 1)  # the next test must not see it


def test_juggler_redis_is_fresh_for_the_next_test_too(juggler_redis):
    assert not list(juggler_redis.scan_iter(match="juggler:*"))


# -- a user's test file, run by a plain pytest --------------------------------------------------

USER_TESTS = '''
def add(args):
    return args[0] + args[1]


def test_call(juggler_callee, juggler_client):
    juggler_callee.register("math.add", add)
    assert juggler_client.call("math.add", [1, 2], timeout=10) == 3


def test_pubsub(juggler_client):
    sub = juggler_client.sub("news")
    juggler_client.pub("news", {"x": 1})
    assert sub.get(timeout=10).args == {"x": 1}


def test_redis(juggler_redis, juggler_broker):
    assert juggler_broker.client is juggler_redis
    juggler_redis.set("juggler:left-by-a-test", 1)  # deleted after the test
'''

#: The user's conftest.py, as docs/testing.rst gives it.
USER_CONFTEST = '''
pytest_plugins = ["juggler.pytest_plugin"]
'''

# Not part of the user's files: it records the threads alive once the session is over.
WITNESS = '''
import json, os, threading


def pytest_unconfigure(config):
    with open(os.environ["THREADS_FILE"], "w") as f:
        json.dump([(t.name, t.daemon) for t in threading.enumerate()], f)
'''


def run_user_tests(tmp_path, *args: str, conftest: str = USER_CONFTEST, **extra_env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(conftest) + textwrap.dedent(WITNESS))
    threads_file = tmp_path / "threads.json"
    e = env(THREADS_FILE=str(threads_file), **extra_env)  # env() drops the JUGGLER_* of this run
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_user.py"],
        cwd=tmp_path, env=e, capture_output=True, text=True, timeout=T(120),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout
    # nothing juggler started is left: the main thread is the only one
    assert json.loads(threads_file.read_text()) == [["MainThread", False]], out.stdout
    return out


def test_plugin_is_no_pytest11_entry_point():
    """Installing juggler does not load its plugin into every pytest run (docs/testing.rst)."""
    from importlib.metadata import entry_points

    assert [ep for ep in entry_points(group="pytest11") if ep.value.startswith("juggler")] == []


def test_a_user_test_file_passes_with_a_plain_pytest_run_and_leaves_no_thread(tmp_path):
    run_user_tests(tmp_path)


def test_the_plugin_loads_with_dash_p_too(tmp_path):
    run_user_tests(tmp_path, "-p", "juggler.pytest_plugin", conftest="")


def test_a_suite_that_does_not_ask_for_the_plugin_does_not_import_juggler(tmp_path):
    (tmp_path / "test_other.py").write_text(textwrap.dedent('''
        import sys


        def test_juggler_stays_out(request):
            assert "juggler" not in sys.modules
            assert not request.config.pluginmanager.has_plugin("juggler.pytest_plugin")
    '''))  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_other.py"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=T(60))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.realredis
@pytest.mark.parametrize("how", ["option", "env"])
def test_a_real_redis_from_the_option_or_the_environment_is_cleaned_after(tmp_path, redis_server, how):
    r = redis.Redis.from_url(redis_server.url)
    try:
        r.flushall()
        r.set("not-juggler", "kept")  # the user's own keys stay
        r.set("juggler:from-an-earlier-run", 1)  # cleaned before the tests, too
        if how == "option":
            run_user_tests(tmp_path, "--juggler-redis", redis_server.url)
        else:
            run_user_tests(tmp_path, JUGGLER_TEST_REDIS_URL=redis_server.url)
        assert r.get("not-juggler") == b"kept"
        assert list(r.scan_iter(match="juggler:*")) == []
        # the tests ran on that redis: its server counted their commands
        assert r.info("commandstats").get("cmdstat_publish", {}).get("calls", 0) >= 1
    finally:
        r.flushall()
        r.close()


def test_plugin_option_is_in_pytest_help_where_the_suite_loads_it(tmp_path):
    def help_text() -> str:
        return subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=T(60)).stdout  # fmt: skip

    assert "--juggler-redis" not in help_text()
    (tmp_path / "conftest.py").write_text(USER_CONFTEST)
    assert "--juggler-redis=URL" in help_text()
