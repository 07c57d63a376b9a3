"""``juggler statesync-demo``, run as a real subprocess: its page, its websocket and its state."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
import websocket

from juggler import statesync
from juggler.statesync.demo import Demo, serve_demo

from .conftest import T
from .statesync_util import Watch
from .test_cli import Proc, juggler


@pytest.fixture
def demo():
    p = Proc("statesync-demo", "--port", "0", "--log-level", "warning")
    try:
        page = p.expect(r"page: +(http://\S+)").group(1)
        ws_url = p.expect(r"websocket: +(ws://\S+)").group(1)
        p.expect(r"^stop:")
        yield p, page, ws_url
    finally:
        p.close()


def fetch(page: str, path: str) -> http.client.HTTPResponse:
    u = urllib.parse.urlsplit(page)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=T(10))
    c.request("GET", path)
    r = c.getresponse()
    r.body = r.read()
    c.close()
    return r


def test_demo_serves_its_page_and_syncs_a_shared_counter(demo):
    p, page, ws_url = demo
    r = fetch(page, "/")
    assert r.status == 302 and r.getheader("Location") == "/index.html"
    r = fetch(page, "/index.html")
    assert r.status == 200 and b"<title>juggler statesync demo</title>" in r.body
    a = statesync.connect(ws_url, autoflush_delay=0)
    b = statesync.connect(ws_url, autoflush_delay=0)
    try:
        wa, wb = Watch(a), Watch(b)
        wb.until(lambda d: d is not None and len(d["clients"]) == 2)
        a.set_local_data({"name": "alice"})
        wb.until(lambda d: {"id": d["clients"][0]["id"], "name": "alice"} in d["clients"])
        rpc = statesync.RpcConnection(a)
        assert rpc.call("increment", 5, timeout=T(5)) == 5
        assert wb.until(lambda d: d["counter"] == 5)["you"] != wa.until(lambda d: d["counter"] == 5)["you"]
        with pytest.raises(statesync.RemoteError, match="whole number"):
            rpc.call("increment", "lots", timeout=T(5))
        assert statesync.RpcConnection(b).call("reset", timeout=T(5)) == 0
        wa.until(lambda d: d["counter"] == 0)
        a.close()
        wb.until(lambda d: len(d["clients"]) == 1)
    finally:
        a.close()
        b.close()
    assert p.stop(signal.SIGTERM) == 0


def test_demo_on_another_websocket_path():
    server = serve_demo(ws_path="/sync")
    try:
        assert server.url.endswith("/sync")
        r = fetch(server.http_url, "/")
        assert r.getheader("Location") == "/index.html?ws=/sync"
        conn = statesync.connect(server.url)
        try:
            assert Watch(conn).until(lambda d: d is not None)["counter"] == 0
        finally:
            conn.close()
    finally:
        server.close()


def test_demo_increment_takes_whole_numbers_only():
    demo = Demo()
    assert demo.increment(2) == 2
    for bad in (True, 1.5, "1", 10_000):
        with pytest.raises(ValueError):
            demo.increment(bad)
    assert demo.reset() == 0


def test_demo_usage_errors():
    out = juggler("statesync-demo", "--certfile", "x.pem")
    assert out.returncode == 2 and "--certfile and --keyfile go together" in out.stderr
    out = juggler("--help")
    assert "statesync-demo" in out.stdout


# -- the page in a real browser -------------------------------------------------------------------


class Browser:
    """Headless Chromium on one page, driven over the DevTools protocol (with websocket-client)."""

    def __init__(self, exe: str, url: str, profile: str) -> None:
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            port = None
            for line in self.proc.stderr:  # its first lines say where DevTools listens
                m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
                if m:
                    port = int(m.group(1))
                    break
            assert port is not None, "chromium did not start its DevTools endpoint"
            threading.Thread(target=self.proc.stderr.read, name="test-chromium-stderr", daemon=True).start()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=T(10)) as r:
                page = next(t for t in json.loads(r.read()) if t["type"] == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=T(10), suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count(1)

    def eval(self, expression: str) -> Any:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))  # fmt: skip
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                result = reply["result"]
                assert "exceptionDetails" not in result, result
                return result["result"].get("value")

    def until(self, expression: str, expected: Any, timeout: float = 15) -> None:
        """Wait until the page's ``expression`` is ``expected``: a bounded poll of what the page
        shows (the browser has no callback into the test)."""
        deadline = time.monotonic() + T(timeout)
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"  # page still loading
        while (value := self.eval(guarded)) != expected:
            assert time.monotonic() < deadline, f"{expression} is {value!r}, not {expected!r}"
            time.sleep(0.02)

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(T(10))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the browser tests")
        pytest.skip("chromium is not installed")
    return exe


@pytest.mark.timeout(120)
def test_the_demo_page_in_a_browser_syncs_both_ways(chromium, tmp_path):
    server = serve_demo()
    browser = None
    peer = statesync.connect(server.url, autoflush_delay=0)
    try:
        peer.set_local_data({"name": "python"})
        browser = Browser(chromium, server.http_url, str(tmp_path / "profile"))
        browser.until("document.getElementById('status').textContent", "open")
        # the server's patches, applied by the page's JavaScript
        assert statesync.RpcConnection(peer).call("increment", 3, timeout=T(5)) == 3
        browser.until("document.getElementById('counter').textContent", "3")
        browser.until("document.querySelectorAll('#clients li').length", 2)
        # the page's RPC call
        browser.eval("document.getElementById('inc').click()")
        Watch(peer).until(lambda d: d["counter"] == 4)
        # the page's own local data, as patches the server applies
        browser.eval("const i = document.getElementById('name'); i.value = 'chromium ~/x'; "
                     "i.dispatchEvent(new Event('input'))")  # fmt: skip
        data = Watch(peer).until(lambda d: any(c["name"] == "chromium ~/x" for c in d["clients"]))
        browser_id = next(c["id"] for c in data["clients"] if c["name"] == "chromium ~/x")
        # and the page gets its name back in the server's state
        browser.until("document.getElementById('remote').textContent.includes('chromium ~/x')", True)
        shown = json.loads(browser.eval("document.getElementById('remote').textContent"))
        assert shown == {**data, "you": browser_id}
    finally:
        if browser is not None:
            browser.close()
        peer.close()
        server.close()
