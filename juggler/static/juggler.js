// juggler.js: the browser client of juggler (the juggler.0 protocol). An ES module with no
// dependencies; a juggler server serves it at GET /juggler.js, its types at /juggler.d.ts.
//
//   import { connect, CallExpired, NackError, RemoteError, ConnectionClosed } from "/juggler.js";
//   const client = await connect("ws://127.0.0.1:9000/ws", { reconnect: true });
//   const text = await client.call("test.reverse", "hello", { timeout: 5000 });   // "olleh"
//
// Guarantees (docs/browser.rst):
// - every call settles exactly once: its result, RemoteError, NackError, CallExpired or
//   ConnectionClosed; it is registered as pending before its frame is sent, and a RES that
//   comes after its CallExpired is ignored;
// - every pub, sub and unsubscribe settles: ACK, NackError, AckTimeout or ConnectionClosed;
// - with reconnect: true, a lost connection is reopened with capped exponential backoff and
//   jitter, every active subscription is subscribed again, then "reconnect" is emitted;
//   requests pending at the loss reject with ConnectionClosed (nobody knows whether they ran);
// - a subscription of a channel with history (the server's --history) resubscribes from the
//   last event it got, so the events published meanwhile arrive first, once, in order; when the
//   server cannot recover them, "gap" is emitted and the subscription's gaps count goes up.
// Timeouts are in milliseconds.

const SUBPROTOCOL = "juggler.0";
const CALL = 1, PUB = 2, SUB = 3, UNSB = 4, NACK = 7, ACK = 8, RES = 9, EVNT = 10;
const TYPE_NAMES = { 1: "CALL", 2: "PUB", 3: "SUB", 4: "UNSB", 7: "NACK", 8: "ACK", 9: "RES", 10: "EVNT" };
const REQUEST_TYPES = { call: CALL, pub: PUB, sub: SUB, unsb: UNSB };
// The query parameters a juggler server reads from the handshake (a browser cannot send headers
// with a websocket): the allowed request types (what the Juggler-Allowed-Messages header says),
// and an id under which the server keeps a refusal, so that a refused handshake can be explained.
const ALLOWED_PARAM = "juggler-allowed-messages";
const HANDSHAKE_PARAM = "juggler-handshake";
const REFUSAL_PARAM = "juggler-refusal";
const MAX_TIMER_MS = 2147483647; // setTimeout fires at once for longer delays
// HTTP statuses of a refused handshake that another try will not change.
const PERMANENT_REFUSALS = new Set([400, 401, 403, 404, 405, 426]);

/** Defaults of connect()'s options (milliseconds and bytes). */
export const DEFAULTS = Object.freeze({
  reconnect: false,
  callTimeout: 60000, // the server's default, too
  ackTimeout: 10000,
  connectTimeout: 10000,
  reconnectDelay: 250, // the first retry waits 125-250 ms, each next one up to twice as long
  maxReconnectDelay: 30000,
  maxBufferedBytes: 1 << 20, // bytes handed to the socket and not yet sent, before requests fail
});

// -- errors ------------------------------------------------------------------------------------

/** Base class of every error juggler.js rejects with. */
export class JugglerError extends Error {
  constructor(message) {
    super(message);
    this.name = "JugglerError";
  }
}

/** The connection closed before the request settled; code and reason of the close. */
export class ConnectionClosed extends JugglerError {
  constructor(code = 1006, reason = "") {
    super(`connection closed: ${code} ${reason}`.trim());
    this.name = "ConnectionClosed";
    this.code = code;
    this.reason = reason;
  }
}

/** The websocket could not be opened; status is the HTTP status of the refusal, 0 if unknown. */
export class HandshakeError extends JugglerError {
  constructor(message, status = 0, reason = "") {
    super(message);
    this.name = "HandshakeError";
    this.status = status;
    this.reason = reason;
  }
}

/** The server refused the request with a NACK: code (HTTP-like) and message. */
export class NackError extends JugglerError {
  constructor(code, message, nack = null) {
    super(message);
    this.name = "NackError";
    this.code = code;
    this.nack = nack;
  }
}

/** The callee answered with an error result {"error": {"message": ...}}. */
export class RemoteError extends JugglerError {
  constructor(message, result = null) {
    super(message);
    this.name = "RemoteError";
    this.result = result;
  }
}

/** A call got no result within its timeout (a RES that comes later is ignored). */
export class CallExpired extends JugglerError {
  constructor(uri, timeout) {
    super(`call to ${uri} expired after ${timeout} ms`);
    this.name = "CallExpired";
    this.uri = uri;
    this.timeout = timeout;
  }
}

/** The server answered a pub, sub or unsubscribe with neither ACK nor NACK in time. */
export class AckTimeout extends JugglerError {
  constructor(what, timeout) {
    super(`${what} got no ACK or NACK within ${timeout} ms`);
    this.name = "AckTimeout";
    this.timeout = timeout;
  }
}

/** The events a client emits: "open", "close", "reconnect", "gap" and "message", with their fields. */
export class JugglerEvent extends Event {
  constructor(type, fields) {
    super(type);
    Object.assign(this, fields);
  }
}

// -- helpers -----------------------------------------------------------------------------------

function newUuid() {
  // crypto.randomUUID exists in secure contexts only; getRandomValues everywhere.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function errorMessage(result) {
  // The result of a callee that failed: exactly {"error": {"message": "<text>"}}.
  if (result === null || typeof result !== "object" || Array.isArray(result)) return null;
  const keys = Object.keys(result);
  if (keys.length !== 1 || keys[0] !== "error") return null;
  const err = result.error;
  if (err === null || typeof err !== "object" || typeof err.message !== "string") return null;
  return err.message;
}

function websocketUrl(url) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  let u;
  try {
    u = new URL(url, base);
  } catch (err) {
    throw new TypeError(`not a URL: ${url}`);
  }
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`not a websocket URL (ws:// or wss://): ${url}`);
  }
  u.hash = "";
  return u;
}

// The history position (offset, epoch) an EVNT or a SUB's ACK carries, or null.
function positionOf(payload) {
  if (typeof payload?.offset !== "string" || payload.offset === "") return null;
  return { offset: payload.offset, epoch: String(payload.epoch ?? "") };
}

function milliseconds(name, value) {
  if (typeof value !== "number" || !(value >= 1 && value <= MAX_TIMER_MS)) {
    throw new TypeError(`${name} must be a number of milliseconds from 1 to ${MAX_TIMER_MS}, got ${value}`);
  }
  return value;
}

function parseAllowed(list) {
  if (list === undefined || list === null) return null;
  if (!Array.isArray(list) || list.length === 0) {
    throw new TypeError('allowedMessages must be a non-empty array of "call", "sub", "unsb", "pub" (or leave it out)');
  }
  const names = list.map((x) => String(x).trim().toLowerCase());
  if (names.length === 1 && names[0] === "*") return null;
  for (const n of names) {
    if (!(n in REQUEST_TYPES)) throw new TypeError(`unknown message type in allowedMessages: ${n}`);
  }
  return new Set(names);
}

// Why a websocket did not open. Browsers hide the HTTP status of a refused handshake (the
// close event says 1006 and nothing more), so ask the server: a juggler server keeps each
// refusal for a while under the id the handshake carried.
async function explainRefusal(url, id, timeout) {
  const probe = new URL(url.href);
  probe.protocol = url.protocol === "wss:" ? "https:" : "http:";
  probe.search = "";
  probe.searchParams.set(REFUSAL_PARAM, id);
  const shown = `${url.origin}${url.pathname}`;
  let res;
  try {
    res = await fetch(probe.href, { cache: "no-store", credentials: "omit", signal: AbortSignal.timeout(timeout) });
  } catch (err) {
    return new HandshakeError(
      `cannot open ${shown}: the server cannot be reached, or refused the websocket without ` +
        "a reason the browser may read", 0);
  }
  let body = null;
  try {
    body = await res.json();
  } catch (err) {
    body = null;
  }
  if (res.ok && body && typeof body.status === "number") {
    const reason = typeof body.reason === "string" ? body.reason : "";
    return new HandshakeError(`${shown} refused the websocket: ${body.status} ${reason}`.trim(), body.status, reason);
  }
  if (body === null && !res.ok) {  // an HTTP server answered, but not as a juggler server does
    return new HandshakeError(
      `cannot open ${shown}: the server there answered HTTP ${res.status} without saying why the websocket ` +
        "failed (not a juggler server, or one older than this client)", 0);
  }
  return new HandshakeError(
    `cannot open ${shown}: the websocket handshake failed before the server checked it ` +
      "(a proxy or a TLS error, the server's accept queue at its limit, or not a juggler server)", 0);
}

// -- subscriptions -----------------------------------------------------------------------------

/** One sub(): its callback gets each event until unsubscribe() (or the client closes). */
class Subscription {
  #unsubscribe;

  constructor(channel, pattern, callback, unsubscribe) {
    this.channel = channel;
    this.pattern = pattern;
    this.callback = callback;
    /** false once unsubscribed, closed, or refused again after a reconnect (see error). */
    this.active = true;
    /** Why the subscription ended, if it did not end by unsubscribe(). */
    this.error = null;
    /** Reconnects after which the events published meanwhile could not be recovered. */
    this.gaps = 0;
    this.#unsubscribe = unsubscribe;
  }

  /** Undo this subscription (UNSB, unless another subscription of this client shares it). */
  unsubscribe() {
    return this.#unsubscribe(this);
  }
}

// -- the client --------------------------------------------------------------------------------

const START = Symbol("start");

/** One juggler connection (reopened after a loss with reconnect: true). Make it with connect(). */
class Client extends EventTarget {
  #url;
  #options;
  #allowed;
  #state = "connecting"; // "open", "reconnecting", "closed"
  #ws = null; // the open websocket
  #attempt = null; // the websocket of a reconnect attempt in progress
  #pending = new Map(); // message uuid -> {type, what, resolve, reject, timer, sentAt}
  #subs = new Map(); // "c:channel" or "p:pattern" -> {channel, pattern, members, inflight, subscribed}
  #closing = false;
  #closed = null; // resolves when close() is done
  #resolveClosed = null;
  #lastClose = { code: 1006, reason: "" };
  #reconnectTimer = null;
  #attempts = 0;

  constructor(url, options) {
    super();
    this.#url = websocketUrl(url);
    const o = { ...DEFAULTS };
    for (const [name, value] of Object.entries(options || {})) {
      if (!(name in DEFAULTS) && name !== "allowedMessages") throw new TypeError(`unknown option ${name}`);
      if (value !== undefined) o[name] = value;
    }
    for (const name of ["callTimeout", "ackTimeout", "connectTimeout", "reconnectDelay", "maxReconnectDelay"]) {
      milliseconds(name, o[name]);
    }
    if (!(Number.isInteger(o.maxBufferedBytes) && o.maxBufferedBytes > 0)) {
      throw new TypeError(`maxBufferedBytes must be a positive integer, got ${o.maxBufferedBytes}`);
    }
    this.#allowed = parseAllowed(o.allowedMessages);
    o.reconnect = !!o.reconnect;
    this.#options = Object.freeze(o);
    this.#closed = new Promise((resolve) => (this.#resolveClosed = resolve));
  }

  /** The server's websocket URL, as given (resolved against the page). */
  get url() {
    return this.#url.href;
  }

  /** "connecting", "open", "reconnecting" or "closed". */
  get state() {
    return this.#state;
  }

  /** Requests sent and not settled yet (calls, pubs, subs, unsubscribes). */
  get pending() {
    return this.#pending.size;
  }

  async [START]() {
    this.#ws = await this.#open();
    this.#state = "open";
    this.#emit("open", { url: this.url });
    return this;
  }

  // Open a websocket: resolves with it once open, rejects with a HandshakeError.
  #open() {
    const id = newUuid();
    const u = new URL(this.#url.href);
    u.searchParams.set(HANDSHAKE_PARAM, id);
    if (this.#allowed) u.searchParams.set(ALLOWED_PARAM, [...this.#allowed].join(","));
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(u.href, SUBPROTOCOL);
      } catch (err) {
        reject(new HandshakeError(`cannot open ${this.url}: ${err.message}`));
        return;
      }
      this.#attempt = ws;
      let settled = false;
      const timeout = this.#options.connectTimeout;
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        this.#attempt = null;
        ws.onopen = ws.onclose = ws.onmessage = null;
        ws.close();
        reject(new HandshakeError(`cannot open ${this.url}: no answer within ${timeout} ms`, 0));
      }, timeout);
      ws.onopen = () => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.#attempt = null;
        ws.onmessage = (ev) => this.#onMessage(ws, ev.data);
        ws.onclose = (ev) => this.#onClose(ws, ev.code, ev.reason, ev.wasClean);
        resolve(ws);
      };
      ws.onclose = (ev) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.#attempt = null;
        if (this.#closing) {
          reject(new HandshakeError(`cannot open ${this.url}: the client was closed`, 0));
          return;
        }
        explainRefusal(this.#url, id, timeout).then(reject);
      };
    });
  }

  #emit(type, fields) {
    this.dispatchEvent(new JugglerEvent(type, fields));
  }

  #emitMessage(direction, msg, latency) {
    const name = TYPE_NAMES[msg?.meta?.type] || "unknown";
    this.#emit("message", { direction, name, msg, latency });
  }

  // The open connection was lost (or closed by close()).
  #onClose(ws, code, reason, wasClean) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    this.#lastClose = { code, reason };
    const reconnecting = this.#options.reconnect && !this.#closing;
    this.#failPending(new ConnectionClosed(code, reason));
    for (const [key, entry] of this.#subs) {
      entry.subscribed = false; // the server forgot it with the connection
      if (!reconnecting) this.#endMembers(entry, new ConnectionClosed(code, reason));
      if (entry.members.size === 0) this.#subs.delete(key);
    }
    this.#state = reconnecting ? "reconnecting" : "closed";
    this.#emit("close", { code, reason, wasClean, reconnecting });
    if (reconnecting) this.#scheduleReconnect();
    else this.#resolveClosed();
  }

  #failPending(error) {
    for (const uuid of [...this.#pending.keys()]) this.#settle(uuid, error);
  }

  #endMembers(entry, error) {
    for (const s of entry.members) {
      s.active = false;
      s.error = error;
    }
    entry.members.clear();
  }

  #scheduleReconnect() {
    const { reconnectDelay, maxReconnectDelay } = this.#options;
    this.#attempts += 1;
    const cap = Math.min(maxReconnectDelay, reconnectDelay * 2 ** Math.min(this.#attempts - 1, 30));
    const delay = cap / 2 + Math.random() * (cap / 2); // jitter: clients lost together come back apart
    this.#reconnectTimer = setTimeout(() => this.#reconnect(), delay);
  }

  async #reconnect() {
    this.#reconnectTimer = null;
    let ws;
    try {
      ws = await this.#open();
    } catch (err) {
      if (this.#closing) return;
      if (err instanceof HandshakeError && PERMANENT_REFUSALS.has(err.status)) {
        // Trying again will not change the answer: give up, and say why.
        this.#state = "closed";
        for (const entry of this.#subs.values()) this.#endMembers(entry, err);
        this.#subs.clear();
        this.#emit("close", { code: 1006, reason: err.message, wasClean: false, reconnecting: false, error: err });
        this.#resolveClosed();
        return;
      }
      this.#scheduleReconnect();
      return;
    }
    const attempts = this.#attempts;
    this.#attempts = 0;
    this.#ws = ws;
    this.#state = "open";
    this.#emit("open", { url: this.url });
    const failed = await this.#resubscribe();
    if (this.#ws !== ws) return; // lost again meanwhile: its close event said so
    this.#emit("reconnect", { attempts, subscriptions: this.#subs.size, failed });
  }

  async #resubscribe() {
    const failed = [];
    const entries = [...this.#subs.values()].filter((e) => e.members.size > 0 && !e.subscribed);
    await Promise.all(entries.map(async (entry) => {
      const { channel, pattern } = entry;
      entry.inflight += 1;
      const since = entry.position;
      try {
        const ack = await this.#request(SUB, since ? { channel, pattern, since } : { channel, pattern }, `SUB ${channel}`);
        entry.subscribed = true;
        this.#resumed(entry, since, ack);
      } catch (err) {
        if (err instanceof ConnectionClosed) return;
        failed.push({ channel, pattern, error: err });
        this.#endMembers(entry, err);
      } finally {
        entry.inflight -= 1;
        this.#reconcile(entry);
      }
    }));
    return failed;
  }

  // The SUB sent after a reconnect, with `since` (the entry's last position, or null), was ACKed.
  #resumed(entry, since, ack) {
    const position = positionOf(ack);
    if (!since || ack?.recovered === true) {
      entry.position ??= position;
      return;
    }
    entry.position = position;
    for (const s of entry.members) s.gaps += 1;
    console.warn(`juggler: events on ${entry.channel} published while reconnecting are lost (not recoverable ` +
                 `from offset ${since.offset} of epoch ${since.epoch})`);
    this.#emit("gap", { channel: entry.channel, pattern: entry.pattern, since, position,
                        subscriptions: [...entry.members] });
  }

  #allows(name) {
    return this.#allowed === null || this.#allowed.has(name);
  }

  #notAllowed(name) {
    return new JugglerError(`${name.toUpperCase()} is not in this client's allowedMessages`);
  }

  // Send a request; resolves with the ACK (a CALL: with its result). Registered as pending
  // before its frame is sent, since its answer may come before send() returns.
  #request(type, payload, what, timeout) {
    return new Promise((resolve, reject) => {
      const ws = this.#ws;
      if (ws === null || ws.readyState !== WebSocket.OPEN) {
        if (this.#closing) reject(new ConnectionClosed(1000, "closed by the client"));
        else if (ws !== null) reject(new ConnectionClosed(1006, "the connection is closing"));
        else reject(new ConnectionClosed(this.#lastClose.code, this.#lastClose.reason));
        return;
      }
      if (ws.bufferedAmount > this.#options.maxBufferedBytes) {
        reject(new JugglerError(`${ws.bufferedAmount} bytes wait to be sent to the server: over maxBufferedBytes`));
        return;
      }
      const uuid = newUuid();
      const msg = { meta: { type, uuid }, payload };
      let text;
      try {
        text = JSON.stringify(msg);
      } catch (err) {
        reject(new TypeError(`${what}: args are not JSON: ${err.message}`));
        return;
      }
      const entry = { type, what, resolve, reject, timer: null, sentAt: performance.now() };
      this.#pending.set(uuid, entry);
      const limit = type === CALL ? timeout : this.#options.ackTimeout;
      entry.timer = setTimeout(() => {
        this.#settle(uuid, type === CALL ? new CallExpired(payload.uri, timeout) : new AckTimeout(what, limit));
      }, limit);
      try {
        ws.send(text);
      } catch (err) {
        this.#settle(uuid, new ConnectionClosed(1006, `send failed: ${err.message}`));
        return;
      }
      this.#emitMessage("out", msg, undefined);
    });
  }

  // Settle a pending request exactly once: false if it had settled already.
  #settle(uuid, error, value) {
    const entry = this.#pending.get(uuid);
    if (entry === undefined) return false;
    this.#pending.delete(uuid);
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(value);
    return true;
  }

  #onMessage(ws, data) {
    if (ws !== this.#ws || typeof data !== "string") return; // juggler sends text frames only
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (err) {
      console.warn("juggler: a message that is not JSON was dropped:", data.slice(0, 200));
      return;
    }
    const type = msg?.meta?.type;
    const p = msg && typeof msg.payload === "object" && msg.payload !== null ? msg.payload : {};
    if (type === EVNT) {
      this.#emitMessage("in", msg, undefined);
      this.#deliver(p);
      return;
    }
    if (type !== ACK && type !== NACK && type !== RES) {
      console.warn("juggler: a message of unknown type was dropped:", data.slice(0, 200));
      return;
    }
    const entry = this.#pending.get(p.for);
    const latency = entry ? performance.now() - entry.sentAt : undefined;
    this.#emitMessage("in", msg, latency);
    if (entry === undefined) return; // e.g. the RES of a call that expired: ignored
    if (type === NACK) {
      this.#settle(p.for, new NackError(p.code, String(p.message ?? ""), msg));
    } else if (type === RES) {
      if (entry.type !== CALL) return;
      const message = errorMessage(p.args);
      if (message !== null) this.#settle(p.for, new RemoteError(message, p.args));
      else this.#settle(p.for, null, p.args === undefined ? null : p.args);
    } else if (entry.type !== CALL) {
      this.#settle(p.for, null, p); // ACK of a PUB, SUB or UNSB: its payload
    }
    // The ACK of a CALL: its RES (or its timer) settles it.
  }

  #deliver(p) {
    const pattern = typeof p.pattern === "string" ? p.pattern : "";
    const entry = this.#subs.get(pattern ? `p:${pattern}` : `c:${p.channel}`);
    if (!entry) return; // unsubscribed: the server may still have sent it
    const event = { channel: p.channel, pattern, args: p.args === undefined ? null : p.args, for: p.for };
    const position = positionOf(p);
    if (position) {
      entry.position = position; // where a resubscription starts from
      Object.assign(event, position);
    }
    for (const s of [...entry.members]) {
      try {
        s.callback(event);
      } catch (err) {
        console.error("juggler: a subscription callback threw:", err);
      }
    }
  }

  /**
   * Call `uri` with `args`: resolves with the result; rejects with RemoteError, NackError,
   * CallExpired (after options.timeout ms) or ConnectionClosed.
   */
  call(uri, args = null, options = {}) {
    if (!this.#allows("call")) return Promise.reject(this.#notAllowed("call"));
    if (typeof uri !== "string") return Promise.reject(new TypeError("uri must be a string"));
    let timeout;
    try {
      timeout = milliseconds("timeout", options?.timeout ?? this.#options.callTimeout);
    } catch (err) {
      return Promise.reject(err);
    }
    const payload = { uri, timeout: Math.round(timeout * 1e6), args: args === undefined ? null : args };
    return this.#request(CALL, payload, `CALL ${uri}`, timeout);
  }

  /** Publish `args` on `channel`: resolves on ACK, rejects with NackError. */
  async pub(channel, args = null) {
    if (!this.#allows("pub")) throw this.#notAllowed("pub");
    if (typeof channel !== "string") throw new TypeError("channel must be a string");
    await this.#request(PUB, { channel, args: args === undefined ? null : args }, `PUB ${channel}`);
  }

  /**
   * Subscribe to `channel` (a redis glob pattern with {pattern: true}); `callback(event)` gets
   * {channel, pattern, args, for} for each event. Resolves with the subscription once ACKed.
   */
  async sub(channel, options, callback) {
    if (typeof options === "function" && callback === undefined) {
      callback = options;
      options = {};
    }
    if (!this.#allows("sub")) throw this.#notAllowed("sub");
    if (typeof channel !== "string") throw new TypeError("channel must be a string");
    if (typeof callback !== "function") throw new TypeError("sub needs a callback function");
    const pattern = !!options?.pattern;
    const key = `${pattern ? "p" : "c"}:${channel}`;
    let entry = this.#subs.get(key);
    if (entry === undefined) {
      entry = { channel, pattern, members: new Set(), inflight: 0, subscribed: false, position: null };
      this.#subs.set(key, entry);
    }
    entry.inflight += 1;
    try {
      entry.position ??= positionOf(await this.#request(SUB, { channel, pattern }, `SUB ${channel}`));
    } catch (err) {
      entry.inflight -= 1;
      this.#reconcile(entry);
      throw err;
    }
    entry.inflight -= 1;
    entry.subscribed = true;
    if (this.#subs.get(key) !== entry) this.#subs.set(key, entry); // dropped by a loss meanwhile
    const s = new Subscription(channel, pattern, callback, (x) => this.#unsubscribe(key, x));
    entry.members.add(s);
    return s;
  }

  #unsubscribe(key, s) {
    const entry = this.#subs.get(key);
    if (!s.active || entry === undefined || !entry.members.has(s)) {
      s.active = false;
      return Promise.resolve();
    }
    s.active = false;
    entry.members.delete(s);
    return this.#reconcile(entry);
  }

  // Tell the server to drop a subscription nobody here wants any more (none subscribed, none
  // on its way): resolves once it did (UNSB ACKed), at once if there was nothing to do.
  #reconcile(entry) {
    if (entry.members.size > 0 || entry.inflight > 0) return Promise.resolve();
    const key = `${entry.pattern ? "p" : "c"}:${entry.channel}`;
    if (this.#subs.get(key) === entry) this.#subs.delete(key);
    if (!entry.subscribed) return Promise.resolve();
    entry.subscribed = false;
    if (!this.#allows("unsb") || this.#ws === null) return Promise.resolve(); // events are dropped here
    const { channel, pattern } = entry;
    return this.#request(UNSB, { channel, pattern }, `UNSB ${channel}`).then(
      () => undefined,
      (err) => {
        if (err instanceof ConnectionClosed) return undefined; // the server forgot it with the connection
        throw err;
      });
  }

  /** The active subscriptions. */
  get subscriptions() {
    const all = [];
    for (const entry of this.#subs.values()) all.push(...entry.members);
    return all;
  }

  /**
   * Close the connection (and stop reconnecting). Pending requests reject with
   * ConnectionClosed at once; resolves once the websocket has closed.
   */
  close(code = 1000, reason = "") {
    if (code !== 1000 && !(Number.isInteger(code) && code >= 3000 && code <= 4999)) {
      throw new TypeError(`close code must be 1000 or from 3000 to 4999, got ${code}`);
    }
    if (this.#closing) return this.#closed;
    this.#closing = true;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#failPending(new ConnectionClosed(1000, "closed by the client"));
    if (this.#attempt !== null) {
      this.#attempt.close();
      this.#attempt = null;
    }
    if (this.#ws !== null) {
      this.#ws.close(code, reason); // its close event ends the rest (#onClose)
    } else if (this.#state !== "closed") {
      this.#state = "closed";
      for (const entry of this.#subs.values()) this.#endMembers(entry, new ConnectionClosed(1000, "closed by the client"));
      this.#subs.clear();
      this.#emit("close", { code: 1000, reason: "closed by the client", wasClean: true, reconnecting: false });
      this.#resolveClosed();
    }
    return this.#closed;
  }
}

/**
 * Open a connection to the juggler server at `url` (ws://, wss://, or http(s):// and a path
 * relative to the page, which mean the same server). Resolves with the client once the
 * websocket is open; rejects with HandshakeError if it cannot be opened (refused by the
 * server: its status and reason, see docs/browser.rst).
 *
 * options: reconnect (false), allowedMessages (all), callTimeout, ackTimeout, connectTimeout,
 * reconnectDelay, maxReconnectDelay (ms), maxBufferedBytes: see DEFAULTS.
 */
export function connect(url, options = {}) {
  let client;
  try {
    client = new Client(url, options);
  } catch (err) {
    return Promise.reject(err);
  }
  return client[START]();
}
