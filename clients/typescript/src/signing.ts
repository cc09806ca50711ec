// The signing schemes of keygate (docs/signing.md): hmac-v1, hmac-body and bearer.
import { createHash, createHmac, randomUUID } from "node:crypto";

export type Scheme = "hmac-v1" | "hmac-body" | "bearer";

/** A keygate key. `scheme` defaults to `hmac-v1`. */
export interface Credentials {
  publicKey: string;
  secret: string;
  scheme?: Scheme;
}

export const SCHEME_LINE = "KG1-HMAC-SHA256";

const encoder = new TextEncoder();

/** The bytes of a body as they are sent: text as UTF-8. */
export function toBytes(body: string | Uint8Array | ArrayBuffer | null | undefined): Uint8Array {
  if (body === undefined || body === null) return new Uint8Array(0);
  if (typeof body === "string") return encoder.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  throw new TypeError("keygate signs the exact body bytes: pass a string, Uint8Array or ArrayBuffer");
}

export function sha256Hex(body: Uint8Array): string {
  return createHash("sha256").update(body).digest("hex");
}

/** The six lines an hmac-v1 signature covers, joined by LF, no trailing LF. */
export function stringToSign(timestamp: string, nonce: string, method: string, target: string,
                             body: Uint8Array): string {
  return [SCHEME_LINE, timestamp, nonce, method.toUpperCase(), target, sha256Hex(body)].join("\n");
}

// The secret is used as text (its UTF-8 bytes), whatever it looks like.
function hmacHex(secret: string, message: Uint8Array | string): string {
  return createHmac("sha256", encoder.encode(secret)).update(message).digest("hex");
}

export function v1Signature(secret: string, timestamp: string, nonce: string, method: string,
                            target: string, body: Uint8Array): string {
  return hmacHex(secret, stringToSign(timestamp, nonce, method, target, body));
}

/** hmac-body: the HMAC of the raw body bytes (which must hold a JSON `nonce`). */
export function bodySignature(secret: string, body: Uint8Array): string {
  return hmacHex(secret, body);
}

export interface SignOptions {
  /** Milliseconds since the epoch (default `Date.now`). */
  now?: () => number;
  nonce?: string;
}

/**
 * The headers that authenticate one request. `target` is the path and query exactly as sent
 * on the request line, `body` the exact bytes sent. Each call makes a fresh nonce and
 * timestamp (hmac-v1): sign every attempt anew.
 */
export function signHeaders(creds: Credentials, method: string, target: string,
                            body: Uint8Array, opts: SignOptions = {}): Record<string, string> {
  const scheme = creds.scheme ?? "hmac-v1";
  if (scheme === "bearer") return { authorization: `Bearer ${creds.secret}` };
  if (scheme === "hmac-body") {
    return { "x-api-public-key": creds.publicKey, "x-api-signature": bodySignature(creds.secret, body) };
  }
  if (scheme !== "hmac-v1") throw new TypeError(`unknown scheme ${String(scheme)}`);
  const timestamp = String(Math.floor((opts.now ?? Date.now)() / 1000));
  const nonce = opts.nonce ?? randomUUID();
  return {
    "x-api-public-key": creds.publicKey,
    "x-api-timestamp": timestamp,
    "x-api-nonce": nonce,
    "x-api-signature": v1Signature(creds.secret, timestamp, nonce, method, target, body),
  };
}

/** The request target of a URL as clients send it: path and query. */
export function targetOf(url: string | URL): string {
  const u = typeof url === "string" ? new URL(url) : url;
  return u.pathname + u.search;
}

/**
 * Time corrected by keygate's `Date` header after a `stale_timestamp` refusal, so a client
 * whose clock is off signs its retry with keygate's time.
 */
export class Clock {
  offsetMs = 0;
  constructor(private readonly base: () => number = Date.now) {}

  now = (): number => this.base() + this.offsetMs;

  correctFrom(date: string | null | undefined): void {
    if (!date) return;
    const server = Date.parse(date);
    if (!Number.isNaN(server)) this.offsetMs = server - this.base();
  }
}
