"""juggler.js in a real browser: Debian's Chromium, headless, driven by playwright.

Each test loads /juggler.js from a live server (real redis, see conftest) into a page and runs
the client there. Without Chromium or playwright these tests skip, except under ``CI``, where
they fail: CI must run them (``.ci/run`` installs Chromium). ``JUGGLER_CHROMIUM`` names
another Chromium binary.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from types import SimpleNamespace

import pytest

import juggler
from juggler import Client, ConnState, RedisBroker, RefuseConnection, Res, Server, chain
from juggler.layout import epoch_key, history_key

from .conftest import T, free_port, make_redis_client
from .test_cli import ROOT, Proc

CHROMIUM = os.environ.get("JUGGLER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

# Run in every test page: settle(promise) gives what a promise settled with as JSON;
# next(client, type, test) the next event of a type that passes the test.
PRELUDE = """
window.settle = async (p) => {
  try { return { value: await p }; } catch (e) {
    return { error: e.name, message: e.message, code: e.code, reason: e.reason, status: e.status,
             juggler: e instanceof window.J.JugglerError };
  }
};
window.next = (c, type, test = () => true) => new Promise((resolve) => {
  const listener = (e) => { if (test(e)) { c.removeEventListener(type, listener); resolve(e); } };
  c.addEventListener(type, listener);
});
"""


@pytest.fixture(scope="session")
def browser():
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed (pip install '.[test]')"
    if problem is None and not os.access(CHROMIUM, os.X_OK):
        problem = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{problem}, and CI must run the browser tests")
        pytest.skip(problem)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


def http_base(server: Server) -> str:
    return f"http://{server.host}:{server.port}"


@pytest.fixture
def pages(browser):
    """``open(server, origin=None)``: a page of ``origin`` (default: the server's) with
    juggler.js imported from ``server`` as ``window.J``. Fails the test on a page error."""
    contexts = []
    errors: list[str] = []

    def open_page(server: Server, origin: str | None = None):
        context = browser.new_context()
        context.set_default_timeout(T(20) * 1000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # A page the server serves (any will do: /healthz): Chromium's local network access
        # checks would block a websocket to 127.0.0.1 from a page that came from nowhere.
        page.goto(f"{origin or http_base(server)}/healthz")
        page.add_script_tag(content=PRELUDE)
        page.evaluate("async (src) => { window.J = await import(src); }", f"{http_base(server)}/juggler.js")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"errors in the page: {errors}"


@pytest.fixture
def redis_client(request):
    """The session's real redis-server only (conftest's make_stack takes it): these tests are
    about the browser, the server's redis layer has its own on fakeredis and real redis."""
    client = make_redis_client("real", request)
    yield client
    client.close()


def test_calls_settle_with_each_outcome(make_stack, pages):
    server = make_stack().server
    page = pages(server)
    out = page.evaluate(
        """async (url) => {
        const c = await J.connect(url);
        const r = {
          reverse: await settle(c.call("test.reverse", "hello", { timeout: 5000 })),
          echo: await settle(c.call("test.echo", { x: [1, "y", null] })),
          remote: await settle(c.call("test.fail", "boom", { timeout: 5000 })),
          nack: await settle(c.call("test.echo", 1, { timeout: 601000 })),
          expired: await settle(c.call("nobody.serves.this", 1, { timeout: 300 })),
          badTimeout: await settle(c.call("test.echo", 1, { timeout: -5 })),
          pubNack: await settle(c.pub("", 1)),
          pending: c.pending,
        };
        await c.close();
        r.afterClose = await settle(c.call("test.echo", 1));
        r.state = c.state;
        return r;
    }""",
        server.url,
    )
    assert out["reverse"] == {"value": "olleh"}
    assert out["echo"] == {"value": {"x": [1, "y", None]}}
    assert out["remote"]["error"] == "RemoteError" and out["remote"]["message"] == "failed on purpose: boom"
    assert out["nack"]["error"] == "NackError" and out["nack"]["code"] == 400
    assert out["nack"]["message"] == "timeout over the server's maximum of 600 s"
    assert out["expired"]["error"] == "CallExpired"
    assert out["expired"]["message"] == "call to nobody.serves.this expired after 300 ms"
    assert out["badTimeout"]["error"] == "TypeError"
    assert out["pubNack"] == {**out["pubNack"], "error": "NackError", "code": 400, "message": "PUB has no channel"}
    assert out["pending"] == 0
    assert out["afterClose"]["error"] == "ConnectionClosed" and out["afterClose"]["code"] == 1000
    assert out["state"] == "closed"
    assert all(v.get("juggler") for k, v in out.items() if k not in ("badTimeout",) and isinstance(v, dict) and "error" in v)


def test_a_result_after_call_expired_is_ignored(make_stack, pages):
    held, release = threading.Event(), threading.Event()

    def hold_late_result(next_handler):
        def handle(conn, msg):
            if isinstance(msg, Res) and msg.args == "late":
                held.set()
                release.wait(T(20))  # the RES goes out once the page has seen CallExpired
            next_handler(conn, msg)

        return handle

    server = make_stack(handler=chain(hold_late_result)).server
    page = pages(server)
    try:
        page.evaluate(
            """async (url) => {
            const c = window.c = await J.connect(url);
            window.settled = 0;
            window.unmatched = [];
            c.addEventListener("message", (e) => { if (e.direction === "in" && e.latency === undefined) unmatched.push(e.name); });
            const p = c.call("test.echo", "late", { timeout: 500 });
            p.then(() => settled++, () => settled++);
            window.first = await settle(p);
        }""",
            server.url,
        )
        assert held.wait(T(10)), "the server never had the result"
        assert page.evaluate("first.error") == "CallExpired"
    finally:
        release.set()
    page.wait_for_function("unmatched.length === 1")
    out = page.evaluate(
        """async () => ({ unmatched, settled, pending: c.pending, first,
                          next: await settle(c.call("test.reverse", "ab", { timeout: 5000 })) })"""
    )
    assert out["unmatched"] == ["RES"]
    assert out["settled"] == 1 and out["pending"] == 0
    assert out["next"] == {"value": "ba"}


def test_a_lost_connection_rejects_pending_calls_with_the_close_code(make_stack, pages):
    server = make_stack().server
    page = pages(server)
    page.evaluate(
        """async (url) => {
        const c = window.c = await J.connect(url);
        window.closes = [];
        c.addEventListener("close", (e) => closes.push({ code: e.code, reason: e.reason, reconnecting: e.reconnecting }));
        const acked = next(c, "message", (e) => e.name === "ACK");
        window.pendingCall = settle(c.call("nobody.serves.this", 1, { timeout: 10000 }));
        await acked;
    }""",
        server.url,
    )
    (conn,) = server.connections
    conn.close(4001, "closed by the test")
    out = page.evaluate(
        """async () => ({ call: await pendingCall, closes, state: c.state,
                          after: await settle(c.call("test.echo", 1)) })"""
    )
    assert out["call"]["error"] == "ConnectionClosed"
    assert (out["call"]["code"], out["call"]["reason"]) == (4001, "closed by the test")
    assert out["closes"] == [{"code": 4001, "reason": "closed by the test", "reconnecting": False}]
    assert out["state"] == "closed"
    assert (out["after"]["error"], out["after"]["code"]) == ("ConnectionClosed", 4001)

    # close() by the page: what is pending rejects at once, with 1000
    out = page.evaluate(
        """async (url) => {
        const c = await J.connect(url);
        const closed = next(c, "close");
        const acked = next(c, "message", (e) => e.name === "ACK");
        const call = settle(c.call("nobody.serves.this", 1, { timeout: 10000 }));
        await acked;
        c.close();
        const e = await closed;
        return { call: await call, close: { code: e.code, reconnecting: e.reconnecting } };
    }""",
        server.url,
    )
    assert (out["call"]["error"], out["call"]["code"], out["call"]["reason"]) == ("ConnectionClosed", 1000, "closed by the client")
    assert out["close"] == {"code": 1000, "reconnecting": False}


def test_sub_pub_unsb_across_two_pages(make_stack, pages):
    server = make_stack().server
    a, b = pages(server), pages(server)
    a.evaluate(
        """async (url) => {
        const c = window.c = await J.connect(url);
        window.events = [];
        window.unsbs = [];
        c.addEventListener("message", (e) => { if (e.name === "UNSB") unsbs.push(e.msg.payload.channel); });
        const rec = (tag) => (ev) => events.push({ tag, channel: ev.channel, pattern: ev.pattern, args: ev.args });
        window.plain = await c.sub("chat.room1", rec("plain"));
        window.plain2 = await c.sub("chat.room1", { pattern: false }, rec("plain2"));
        window.pat = await c.sub("chat.*", { pattern: true }, rec("pattern"));
        window.end = await c.sub("end", {}, rec("end"));
        window.refused = await settle(c.sub("", {}, rec("never")));
    }""",
        server.url,
    )
    assert a.evaluate("refused.error") == "NackError"
    b.evaluate("async (url) => { window.c = await J.connect(url); }", server.url)

    def publish(*pairs):
        b.evaluate("async (pairs) => { for (const [ch, args] of pairs) await c.pub(ch, args); }", [list(p) for p in pairs])
        a.wait_for_function("events.some((e) => e.tag === 'end')")
        return a.evaluate("() => { const got = events.slice(); events.length = 0; return got; }")

    got = publish(("chat.room1", {"n": 1}), ("chat.room2", {"n": 2}), ("end", 0))
    assert got[-1]["tag"] == "end"
    assert sorted(got[:-1], key=str) == sorted([
        {"tag": "plain", "channel": "chat.room1", "pattern": "", "args": {"n": 1}},
        {"tag": "plain2", "channel": "chat.room1", "pattern": "", "args": {"n": 1}},
        {"tag": "pattern", "channel": "chat.room1", "pattern": "chat.*", "args": {"n": 1}},
        {"tag": "pattern", "channel": "chat.room2", "pattern": "chat.*", "args": {"n": 2}},
    ], key=str)  # fmt: skip

    # one of the two subscriptions of chat.room1 goes: the other still gets its events
    a.evaluate("async () => { await plain.unsubscribe(); }")
    assert a.evaluate("[plain.active, plain2.active, unsbs.length]") == [False, True, 0]
    got = publish(("chat.room1", {"n": 3}), ("end", 0))
    assert [(e["tag"], e["args"]) for e in got] in (
        [("plain2", {"n": 3}), ("pattern", {"n": 3}), ("end", 0)],
        [("pattern", {"n": 3}), ("plain2", {"n": 3}), ("end", 0)],
    )

    # the last of each goes: UNSB, and no event of them comes any more
    a.evaluate("async () => { await plain2.unsubscribe(); await pat.unsubscribe(); await plain.unsubscribe(); }")
    assert a.evaluate("[unsbs.slice().sort(), c.subscriptions.length]") == [["chat.*", "chat.room1"], 1]
    got = publish(("chat.room1", {"n": 4}), ("chat.x", {"n": 5}), ("end", 0))
    assert [e["tag"] for e in got] == ["end"]


def test_allowed_messages_are_enforced(make_stack, pages):
    server = make_stack().server
    page = pages(server)
    out = page.evaluate(
        """async (url) => {
        const c = await J.connect(url, { allowedMessages: ["call"] });
        const r = {
          call: await settle(c.call("test.reverse", "abc", { timeout: 5000 })),
          pub: await settle(c.pub("news", 1)),
          sub: await settle(c.sub("news", () => {})),
          bad: await settle(J.connect(url, { allowedMessages: ["call", "jump"] })),
          typo: await settle(J.connect(url, { reconect: true })),
        };
        window.c = c;
        return r;
    }""",
        server.url,
    )
    assert out["call"] == {"value": "cba"}
    for name in ("pub", "sub"):
        assert out[name]["error"] == "JugglerError"
        assert out[name]["message"] == f"{name.upper()} is not in this client's allowedMessages"
    assert out["bad"]["error"] == "TypeError" and "jump" in out["bad"]["message"]
    assert out["typo"] == {**out["typo"], "error": "TypeError", "message": "unknown option reconect"}
    (conn,) = server.connections
    assert {t.name for t in conn.allowed} == {"CALL"}  # the server was told, too

    # and the server enforces it on a websocket that breaks it (a raw one: the client would not)
    out = page.evaluate(
        """(url) => new Promise((resolve) => {
        const ws = new WebSocket(url + "?juggler-allowed-messages=call,sub", "juggler.0");
        ws.onopen = () => ws.send(JSON.stringify({ meta: { type: 2, uuid: crypto.randomUUID() },
                                                   payload: { channel: "news", args: 1 } }));
        ws.onclose = (e) => resolve({ code: e.code, reason: e.reason });
    })""",
        server.url,
    )
    assert out == {"code": 1008, "reason": "PUB is not allowed on this connection"}


def test_refused_handshakes_reject_connect_with_status_and_reason(make_stack, pages):
    def hook(conn, state):
        if state is ConnState.ACCEPTING and "token=good" not in conn.request.path:
            raise RefuseConnection(401, "missing token")

    plain = make_stack().server
    by_origin = make_stack(allowed_origins=["https://only.example"]).server
    by_hook = make_stack(on_state=hook).server
    full = make_stack(max_connections=1).server
    # a page on another origin (localhost, not 127.0.0.1): the module and the refusal lookups
    # are cross-origin requests
    page = pages(plain, origin=f"http://localhost:{plain.port}")
    with Client.connect(full.url, connect_timeout=T(10)):  # takes the one slot
        out = page.evaluate(
            """async (urls) => {
            const r = {};
            for (const [name, url] of Object.entries(urls)) r[name] = await settle(J.connect(url));
            const ok = r.token.value !== undefined;
            if (ok) { r.token = { value: r.token.value.state }; }
            return r;
        }""",
            {
                "origin": by_origin.url,
                "hook": by_hook.url,
                "token": by_hook.url + "?token=good",
                "full": full.url,
                "nobody": f"ws://127.0.0.1:{free_port()}/ws",
            },
        )
    origin = f"http://localhost:{plain.port}"
    assert out["origin"]["error"] == "HandshakeError"
    assert (out["origin"]["status"], out["origin"]["reason"]) == (403, f"origin {origin} is not allowed")
    assert out["origin"]["message"] == f"{by_origin.url} refused the websocket: 403 origin {origin} is not allowed"
    assert (out["hook"]["status"], out["hook"]["reason"]) == (401, "missing token")
    assert out["token"] == {"value": "open"}
    assert (out["full"]["status"], out["full"]["reason"]) == (503, "server at its connection limit")
    assert out["nobody"]["error"] == "HandshakeError" and out["nobody"]["status"] == 0
    assert "cannot be reached" in out["nobody"]["message"]


RECONNECT_SETUP = """async (url) => {
    // the time of each websocket the client opens, to check the backoff
    const Native = WebSocket;
    window.opened = [];
    window.WebSocket = class extends Native {
      constructor(...args) { super(...args); opened.push(performance.now()); }
    };
    const c = window.c = await J.connect(url, { reconnect: true, reconnectDelay: 200, maxReconnectDelay: 800 });
    window.events = [];
    window.closes = [];
    window.reconnects = [];
    c.addEventListener("close", (e) => closes.push({ code: e.code, reason: e.reason, reconnecting: e.reconnecting,
                                                     at: performance.now(), status: e.error && e.error.status }));
    c.addEventListener("reconnect", (e) => reconnects.push({ attempts: e.attempts, subscriptions: e.subscriptions,
                                                             failed: e.failed.length }));
    const rec = (ev) => events.push({ channel: ev.channel, pattern: ev.pattern, args: ev.args });
    window.news = await c.sub("news", rec);
    window.alerts = await c.sub("alerts.*", { pattern: true }, rec);
    const acked = next(c, "message", (e) => e.name === "ACK");
    window.pendingCall = settle(c.call("nobody.serves.this", 1, { timeout: 10000 }));
    await acked;
}"""


def reconnecting_page(make_stack, pages):
    """A stack and a page connected to it with reconnect: true (RECONNECT_SETUP), whose
    server has just shut down."""
    stack = make_stack()
    page = pages(stack.server)
    page.evaluate(RECONNECT_SETUP, stack.server.url)
    stack.server.shutdown()
    return stack, page


def test_reconnect_resubscribes_after_the_server_restarts(make_stack, pages):
    stack, page = reconnecting_page(make_stack, pages)
    page.wait_for_function("opened.length >= 5")  # the first websocket and four tries
    down = page.evaluate(
        """async () => ({ call: await pendingCall, closes, state: c.state, subs: c.subscriptions.length,
                          during: await settle(c.call("test.echo", 1)), opened })"""
    )
    assert down["call"]["error"] == "ConnectionClosed"
    assert (down["call"]["code"], down["call"]["reason"]) == (1001, "server shutting down")
    assert [(e["code"], e["reason"], e["reconnecting"]) for e in down["closes"]] == [(1001, "server shutting down", True)]
    assert down["state"] == "reconnecting" and down["subs"] == 2
    assert (down["during"]["error"], down["during"]["code"]) == ("ConnectionClosed", 1001)
    # capped exponential backoff with jitter: try k waits from cap/2 to cap, cap = min(800, 200 * 2^(k-1))
    starts = [down["closes"][0]["at"], *down["opened"][1:5]]
    waits = [b - a for a, b in zip(starts, starts[1:])]
    for wait, cap in zip(waits, (200, 400, 800, 800)):
        assert cap / 2 - 5 <= wait <= cap + T(1500), (waits, cap)

    # the same port; the stack shuts the new server down
    stack.server = Server(stack.broker, port=stack.server.port).start()
    page.wait_for_function("reconnects.length === 1")
    assert page.evaluate("[reconnects[0].subscriptions, reconnects[0].failed, c.state]") == [2, 0, "open"]
    with Client.connect(stack.server.url, connect_timeout=T(10)) as py:
        py.pub("news", {"n": 1})
        py.pub("alerts.fire", {"n": 2})
    page.wait_for_function("events.length === 2")
    assert page.evaluate("events") == [
        {"channel": "news", "pattern": "", "args": {"n": 1}},
        {"channel": "alerts.fire", "pattern": "alerts.*", "args": {"n": 2}},
    ]
    assert page.evaluate("async () => settle(c.call('test.reverse', 'ok', { timeout: 5000 }))") == {"value": "ko"}
    # close() stops it for good
    page.evaluate("async () => { await c.close(); }")
    assert page.evaluate("[c.state, closes.length, closes[1].code, closes[1].reconnecting]") == ["closed", 2, 1000, False]


def test_reconnect_gives_up_when_the_server_refuses_for_good(make_stack, pages):
    stack, page = reconnecting_page(make_stack, pages)
    stack.server = Server(stack.broker, port=stack.server.port, allowed_origins=["https://only.example"]).start()
    page.wait_for_function("closes.length === 2")
    out = page.evaluate("[closes[1], c.state, news.active, news.error && news.error.status, reconnects.length]")
    assert out[0]["reconnecting"] is False and out[0]["status"] == 403
    assert out[1:] == ["closed", False, 403, 0]


@contextlib.contextmanager
def demo_page(browser, width: int):
    """``juggler demo`` and a browser context ``width`` px wide; yields the process, its
    websocket URL, a page open on the demo page and the errors that page logs."""
    demo = Proc("demo", "--port", "0", "--log-level", "warning")
    context = browser.new_context(viewport={"width": width, "height": 860})
    context.set_default_timeout(T(20) * 1000)
    errors: list[str] = []
    try:
        url = demo.expect(r"^browser: +(http://\S+)").group(1)
        ws_url = demo.expect(r"^websocket: +(ws://\S+)").group(1)
        demo.expect(r"^stop:")
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        page.wait_for_selector("#status.open")
        yield SimpleNamespace(demo=demo, url=url, ws_url=ws_url, page=page, context=context, errors=errors)
    finally:
        context.close()
        demo.close()


def test_demo_page_end_to_end(browser):
    with demo_page(browser, 1360) as d:
        demo, url, page, context, errors = d.demo, d.url, d.page, d.context, d.errors

        page.click("#call-btn")  # test.reverse "hello"
        page.wait_for_selector("#call-result.ok")
        assert page.inner_text("#call-result").startswith('"olleh"')
        page.click("#echo-btn")
        page.wait_for_function("document.querySelector('#call-result').textContent.startsWith('{\"x\":[1,2]}')")
        page.click("#delay-btn")  # test.delay 750 with a 500 ms timeout
        page.wait_for_selector("#call-result.bad")
        assert page.inner_text("#call-result").startswith("CallExpired: call to test.delay expired after 500 ms")

        page.click("#sub-btn")  # news.*, a pattern
        page.wait_for_selector(".chip")
        page.click("#pub-btn")  # news.today
        page.wait_for_selector("#log td.what:has-text('news.today via news.*')")

        # a second tab publishes; the first one gets the event
        other = context.new_page()
        other.goto(url)
        other.wait_for_selector("#status.open")
        other.fill("#pub-channel", "news.sports")
        other.click("#pub-btn")
        other.wait_for_selector("#pub-result:has-text('published')")
        page.wait_for_selector("#log td.what:has-text('news.sports via news.*')")

        rows = page.eval_on_selector_all(
            "#log tr", "rows => rows.map(r => [r.querySelector('.b').textContent, r.querySelector('.ms').textContent])"
        )
        badges = {b for b, _ in rows}
        assert {"CALL", "ACK", "RES", "SUB", "PUB", "EVNT", "EXP"} <= badges
        for badge in ("ACK", "RES"):  # the latency of each answer
            assert all(re.fullmatch(r"\d+\.\d ms", ms) for b, ms in rows if b == badge), rows
        # an event of our own PUB has the latency from it; one from the other tab has none
        assert sorted(ms != "" for b, ms in rows if b == "EVNT") == [False, True], rows

        page.click(".chip button")  # unsubscribe
        page.wait_for_selector("#log .b:has-text('UNSB')")
        page.wait_for_selector("#subs .none")

        assert not errors, errors
        assert demo.stop(signal.SIGTERM) == 0
        page.wait_for_selector("#status.reconnecting")  # (its failed tries are logged as errors)


def docs_example_page() -> str:
    """The example page of docs/browser.rst."""
    text = (ROOT / "docs" / "browser.rst").read_text().split(".. code-block:: html\n", 1)[1]
    lines = []
    for line in text.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def test_the_docs_example_page_works_served_by_another_server(make_stack, browser, tmp_path):
    """docs/browser.rst's page, served by a plain HTTP server as it says, with the juggler
    server's address (a free port here, 9000 in the docs) in its two URLs."""
    import functools
    import http.server

    stack = make_stack()
    page_text = docs_example_page()
    assert page_text.count("127.0.0.1:9000") == 2
    (tmp_path / "example.html").write_text(page_text.replace("127.0.0.1:9000", f"127.0.0.1:{stack.server.port}"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    pages_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=pages_server.serve_forever, name="test-pages-server")
    serving.start()
    context = browser.new_context()
    context.set_default_timeout(T(20) * 1000)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{pages_server.server_address[1]}/example.html")
        page.wait_for_function("document.getElementById('out').textContent.includes('done')")
        out = page.inner_text("#out").splitlines()
    finally:
        context.close()
        pages_server.shutdown()
        serving.join()
        pages_server.server_close()
    assert not errors, errors
    assert out[0] == "olleh"
    assert 'news.today news.* {"title":"juggler"}' in out
    assert any(line.startswith("expired: ") for line in out), out
    assert out[-1] == "done"


def test_demo_page_at_420_px_keeps_typed_args_and_explains_a_wrong_path(browser):
    """Issue 22: at 420 px the header fits; choosing a URI replaces only the args the page filled
    in itself; a wrong websocket path says what the server answered (404), not that the
    handshake failed before the server checked it."""
    with demo_page(browser, 420) as d:
        page, ws_url, errors = d.page, d.ws_url, d.errors

        overflow = page.evaluate("""() => {
            const right = (el) => el.getBoundingClientRect().right;
            return { page: document.documentElement.scrollWidth, header: document.querySelector('header').scrollWidth,
                     children: [...document.querySelectorAll('header > *')].map(right) };
        }""")
        assert overflow["page"] <= 420 and overflow["header"] <= 420, overflow
        assert all(r <= 420 for r in overflow["children"]), overflow

        def choose(uri: str) -> None:
            page.fill("#call-uri", uri)
            page.dispatch_event("#call-uri", "change")

        choose("test.delay")  # the page's own example args: replaced by the new URI's
        assert page.input_value("#call-args") == "250"
        page.fill("#call-args", "1200")  # the user's own: kept
        choose("test.echo")
        assert page.input_value("#call-args") == "1200"
        page.fill("#call-args", "")  # nothing: filled in
        choose("test.reverse")
        assert page.input_value("#call-args") == '"hello"'

        page.fill("#url", ws_url.replace("/ws", "/wrong"))
        page.click("#connect-btn")
        page.wait_for_selector("#status.closed")
        message = page.inner_text("#log td.what:has-text('HandshakeError')")
        assert message == f"HandshakeError: {ws_url.replace('/ws', '/wrong')} refused the websocket: 404 no websocket " \
                          "endpoint at /wrong", message
        # the browser logs the refused handshake itself; nothing else went wrong
        assert [e for e in errors if "/wrong?juggler-handshake=" not in e] == [], errors


# -- channel history (issue 21): recovery across a reconnect, or a gap told ---------------------

HISTORY_SETUP = """async (url) => {
  window.events = []; window.gaps = []; window.reconnects = 0;
  window.c = await J.connect(url, { reconnect: true, reconnectDelay: 100, maxReconnectDelay: 200 });
  c.addEventListener("reconnect", () => { reconnects += 1; });
  c.addEventListener("gap", (e) => { gaps.push({ channel: e.channel, since: e.since, position: e.position,
                                                  n: e.subscriptions.length }); });
  window.s = await c.sub("chat.js", (e) => { events.push({ args: e.args, offset: e.offset, epoch: e.epoch }); });
}"""


def test_juggler_js_recovers_what_was_published_while_it_reconnected(real, pages):
    port = free_port()
    history = ["chat.*=100,60s"]
    server = Server(RedisBroker(real), port=port, history=history).start()
    servers = [server]
    try:
        page = pages(server)
        page.evaluate(HISTORY_SETUP, server.url)
        for i in range(3):
            juggler.publish(real, "chat.js", i)
        page.wait_for_function("events.length === 3")
        server.shutdown()
        for i in range(3, 8):  # while the page is away
            juggler.publish(real, "chat.js", i)
        servers.append(Server(RedisBroker(real), port=port, history=history).start())
        page.wait_for_function("reconnects === 1")
        juggler.publish(real, "chat.js", 8)
        page.wait_for_function("events.length >= 9")
        events = page.evaluate("events")
        assert [e["args"] for e in events] == list(range(9))
        assert len({e["epoch"] for e in events}) == 1 and all(e["offset"] for e in events)
        assert page.evaluate("[gaps.length, s.gaps]") == [0, 0]

        # the history lost while away: a gap, told as an event and counted
        servers[-1].shutdown()
        juggler.publish(real, "chat.js", 9)
        real.delete(history_key("chat.js"), epoch_key("chat.js"))
        servers.append(Server(RedisBroker(real), port=port, history=history).start())
        page.wait_for_function("reconnects === 2")
        gaps = page.evaluate("gaps")
        assert len(gaps) == 1 and gaps[0]["channel"] == "chat.js" and gaps[0]["n"] == 1
        assert gaps[0]["since"]["offset"] == events[-1]["offset"] and gaps[0]["position"]["epoch"] != events[-1]["epoch"]
        assert page.evaluate("s.gaps") == 1
        juggler.publish(real, "chat.js", 10)
        page.wait_for_function("events.length === 10")
        assert page.evaluate("events[9].args") == 10
        page.evaluate("async () => { await c.close(); }")
    finally:
        for s in servers:
            s.shutdown()
