// A fetch wrapper that signs each request with a keygate key.
import { Clock, Credentials, signHeaders, targetOf, toBytes } from "./signing.js";
import { KeygateError } from "./errors.js";

export interface KeygateFetchOptions {
  /** The fetch to wrap (default: the global one, Node 18+). */
  fetch?: typeof fetch;
  /** Sign again once, with keygate's clock, after `stale_timestamp` (default true). */
  retryStale?: boolean;
  /** Milliseconds since the epoch (default `Date.now`). */
  now?: () => number;
}

type Body = string | Uint8Array | ArrayBuffer | URLSearchParams | null | undefined;

function bodyOf(init: RequestInit, headers: Headers): Uint8Array {
  const body = init.body as unknown;
  if (body instanceof URLSearchParams) {
    if (!headers.has("content-type")) {
      headers.set("content-type", "application/x-www-form-urlencoded;charset=UTF-8");
    }
    return toBytes(body.toString());
  }
  if (body === undefined || body === null || typeof body === "string"
      || body instanceof Uint8Array || body instanceof ArrayBuffer) {
    return toBytes(body as Body as string | Uint8Array | ArrayBuffer | null | undefined);
  }
  throw new TypeError("keygate signs the whole body: pass a string, Uint8Array, ArrayBuffer or "
    + "URLSearchParams (JSON.stringify objects), not a stream, Blob or FormData");
}

/**
 * `fetch` with keygate signing: `const kfetch = keygateFetch(creds); await kfetch(url, init)`.
 * The body is signed and sent as the same bytes; the target is the URL's path and query as
 * fetch sends them.
 */
export function keygateFetch(creds: Credentials, opts: KeygateFetchOptions = {}) {
  const base = opts.fetch ?? globalThis.fetch;
  const clock = new Clock(opts.now);
  const retryStale = opts.retryStale ?? true;
  const send = (url: URL, init: RequestInit, body: Uint8Array): Promise<Response> => {
    const headers = new Headers(init.headers);
    const method = (init.method ?? "GET").toUpperCase();
    for (const [k, v] of Object.entries(signHeaders(creds, method, targetOf(url), body,
      { now: clock.now }))) {
      headers.set(k, v);
    }
    return base(url, { ...init, method, headers, body: body.length ? (body as BodyInit) : undefined });
  };
  return async function signedFetch(input: string | URL, init: RequestInit = {}): Promise<Response> {
    if (typeof input !== "string" && !(input instanceof URL)) {
      throw new TypeError("pass a URL and init; a Request's body cannot be signed as sent");
    }
    const url = new URL(input);
    const headers = new Headers(init.headers);
    const body = bodyOf(init, headers);
    const first = await send(url, { ...init, headers }, body);
    if (!retryStale || (creds.scheme ?? "hmac-v1") !== "hmac-v1" || first.status !== 401) {
      return first;
    }
    const err = KeygateError.fromParts(first.status, first.headers, await first.clone().text());
    if (!err?.retryableWithFreshSignature) return first;
    clock.correctFrom(first.headers.get("date"));
    return send(url, { ...init, headers }, body);
  };
}
