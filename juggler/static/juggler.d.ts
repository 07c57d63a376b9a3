// Types of juggler.js, the browser client of juggler (served at GET /juggler.d.ts).
// Timeouts and delays are in milliseconds. See docs/browser.rst.

/** A JSON value: what args and results are. */
export type JSONValue = null | boolean | number | string | JSONValue[] | { [key: string]: JSONValue };

/** The request types a connection may send (the server enforces it). */
export type MessageName = "call" | "sub" | "unsb" | "pub";

export interface ConnectOptions {
  /** Reopen a lost connection (capped exponential backoff with jitter) and subscribe again. Default false. */
  reconnect?: boolean;
  /** The only request types this connection may send; the server enforces it. Default: all. */
  allowedMessages?: MessageName[] | ["*"];
  /** Default timeout of call(). Default 60000. */
  callTimeout?: number;
  /** How long pub, sub and unsubscribe wait for the server's ACK or NACK. Default 10000. */
  ackTimeout?: number;
  /** How long opening the websocket may take. Default 10000. */
  connectTimeout?: number;
  /** The first reconnect waits between half this and this; each next one up to twice as long. Default 250. */
  reconnectDelay?: number;
  /** The longest wait between two reconnect attempts. Default 30000. */
  maxReconnectDelay?: number;
  /** Bytes handed to the websocket and not sent yet past which requests reject. Default 1048576. */
  maxBufferedBytes?: number;
}

export const DEFAULTS: Readonly<Required<Omit<ConnectOptions, "allowedMessages">>>;

export interface CallOptions {
  /** Reject with CallExpired after this long; sent to the server as the call's timeout. */
  timeout?: number;
}

export interface SubOptions {
  /** The channel is a redis glob pattern (e.g. "news.*"). Default false. */
  pattern?: boolean;
}

/** An event published on a channel the client subscribed to. */
export interface JugglerEventData {
  channel: string;
  /** The pattern it matched, or "" for a plain subscription. */
  pattern: string;
  args: JSONValue;
  /** The uuid of the PUB that published it. */
  for: string;
  /** On a channel with history: its place in it (a string increasing per channel)... */
  offset?: string;
  /** ...in this history (a random string, new when the history was lost). */
  epoch?: string;
}

/** Where a subscription is in its channel's history. */
export interface Position {
  offset: string;
  epoch: string;
}

export interface Subscription {
  readonly channel: string;
  readonly pattern: boolean;
  readonly callback: (event: JugglerEventData) => void;
  /** false once unsubscribed, closed, or refused again after a reconnect (see error). */
  readonly active: boolean;
  /** Why the subscription ended, when it did not end by unsubscribe(). */
  readonly error: Error | null;
  /** Reconnects after which the events published meanwhile could not be recovered. */
  readonly gaps: number;
  /** UNSB (unless another subscription of this client shares the channel); resolves on ACK. */
  unsubscribe(): Promise<void>;
}

/** The websocket opened (also after a reconnect, before subscribing again). */
export interface OpenEvent extends Event {
  readonly url: string;
}

/** The connection closed: the server's close code and reason, or 1006 when it dropped. */
export interface CloseEvent extends Event {
  readonly code: number;
  readonly reason: string;
  readonly wasClean: boolean;
  /** true when the client will try to reopen it (reconnect: true and not close()). */
  readonly reconnecting: boolean;
  /** When reconnecting gives up: the refusal that made it stop. */
  readonly error?: HandshakeError;
}

/** The connection is open again and every subscription was subscribed again. */
export interface ReconnectEvent extends Event {
  /** Attempts it took. */
  readonly attempts: number;
  readonly subscriptions: number;
  /** Subscriptions the server refused this time (they ended, with error set). */
  readonly failed: { channel: string; pattern: boolean; error: Error }[];
}

/** After a reconnect, the server could not recover the events published on a subscribed channel
 * meanwhile (its history was lost or trimmed past them, or a pattern subscription). */
export interface GapEvent extends Event {
  readonly channel: string;
  readonly pattern: boolean;
  /** The position the client asked to recover from. */
  readonly since: Position;
  /** Where the subscription goes on from (null: the channel keeps no history now). */
  readonly position: Position | null;
  readonly subscriptions: Subscription[];
}

/** Each message sent ("out") or received ("in"), e.g. for a log. */
export interface MessageEvent extends Event {
  readonly direction: "in" | "out";
  /** "CALL", "PUB", "SUB", "UNSB", "ACK", "NACK", "RES" or "EVNT". */
  readonly name: string;
  /** The message as JSON: {meta: {type, uuid}, payload}. */
  readonly msg: { meta: { type: number; uuid: string }; payload: { [key: string]: JSONValue } };
  /** For an ACK, NACK or RES of a pending request: milliseconds since the request was sent. */
  readonly latency: number | undefined;
}

export interface ClientEventMap {
  open: OpenEvent;
  close: CloseEvent;
  reconnect: ReconnectEvent;
  gap: GapEvent;
  message: MessageEvent;
}

export interface Client extends EventTarget {
  /** The server's websocket URL. */
  readonly url: string;
  readonly state: "connecting" | "open" | "reconnecting" | "closed";
  /** Requests sent and not settled yet. */
  readonly pending: number;
  /** The active subscriptions. */
  readonly subscriptions: Subscription[];
  /** Resolves with the result; rejects with RemoteError, NackError, CallExpired or ConnectionClosed. */
  call<T = JSONValue>(uri: string, args?: JSONValue, options?: CallOptions): Promise<T>;
  /** Resolves on ACK; rejects with NackError, AckTimeout or ConnectionClosed. */
  pub(channel: string, args?: JSONValue): Promise<void>;
  /** Resolves once the server ACKed the SUB. */
  sub(channel: string, options: SubOptions, callback: (event: JugglerEventData) => void): Promise<Subscription>;
  sub(channel: string, callback: (event: JugglerEventData) => void): Promise<Subscription>;
  /** Close (code 1000, or 3000-4999) and stop reconnecting; resolves once closed. */
  close(code?: number, reason?: string): Promise<void>;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | AddEventListenerOptions): void;
}

/** Open a connection; rejects with HandshakeError when the websocket cannot be opened. */
export function connect(url: string, options?: ConnectOptions): Promise<Client>;

export class JugglerError extends Error {}
export class ConnectionClosed extends JugglerError {
  readonly code: number;
  readonly reason: string;
}
export class HandshakeError extends JugglerError {
  /** The HTTP status of the refusal, or 0 when the server did not say (see docs/browser.rst). */
  readonly status: number;
  readonly reason: string;
}
export class NackError extends JugglerError {
  /** HTTP-like: 400 a bad request, 403 forbidden, 500 a broker failure. message is the server's. */
  readonly code: number;
  readonly nack: JSONValue;
}
export class RemoteError extends JugglerError {
  /** The error result: {"error": {"message": ...}}. */
  readonly result: JSONValue;
}
export class CallExpired extends JugglerError {
  readonly uri: string;
  readonly timeout: number;
}
export class AckTimeout extends JugglerError {
  readonly timeout: number;
}
export class JugglerEvent extends Event {
  constructor(type: string, fields: object);
}
