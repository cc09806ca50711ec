// An axios interceptor that signs each request with a keygate key. Typed structurally, so
// the library does not depend on axios.
import { Clock, Credentials, signHeaders, toBytes } from "./signing.js";
import { KeygateError } from "./errors.js";

interface HeadersLike {
  set?(name: string, value: string): unknown;
  get?(name: string): unknown;
  [name: string]: unknown;
}

export interface AxiosLikeConfig {
  url?: string;
  baseURL?: string;
  method?: string;
  params?: unknown;
  paramsSerializer?: unknown;
  data?: unknown;
  headers?: HeadersLike;
  [key: string]: unknown;
}

export interface AxiosLike {
  getUri(config?: AxiosLikeConfig): string;
  request(config: AxiosLikeConfig): Promise<unknown>;
  interceptors: {
    request: { use(onFulfilled: (c: AxiosLikeConfig) => AxiosLikeConfig): number };
    response: { use(onFulfilled: undefined, onRejected: (e: unknown) => unknown): number };
  };
}

const RETRIED = "__keygateRetried";

function setHeader(headers: HeadersLike, name: string, value: string): void {
  if (typeof headers.set === "function") headers.set(name, value);
  else headers[name] = value;
}

function hasHeader(headers: HeadersLike, name: string): boolean {
  if (typeof headers.get === "function") return Boolean(headers.get(name));
  return Object.keys(headers).some((k) => k.toLowerCase() === name);
}

/**
 * The body as it will be sent. Objects are serialised here once; every body then travels as a
 * Buffer, which axios's request transforms pass through untouched (a string with a JSON
 * content type would be trimmed, a Uint8Array sent as its whole underlying buffer).
 */
function bodyBytes(config: AxiosLikeConfig, headers: HeadersLike): Uint8Array {
  const data = config.data;
  let bytes: Uint8Array;
  if (data === undefined || data === null) return new Uint8Array(0);
  if (typeof data === "string" || data instanceof Uint8Array || data instanceof ArrayBuffer) {
    bytes = toBytes(data);
  } else if (data instanceof URLSearchParams) {
    bytes = toBytes(data.toString());
    if (!hasHeader(headers, "content-type")) {
      setHeader(headers, "content-type", "application/x-www-form-urlencoded;charset=utf-8");
    }
  } else if (typeof data === "object"
             && (Array.isArray(data) || Object.getPrototypeOf(data) === Object.prototype)) {
    bytes = toBytes(JSON.stringify(data));
    if (!hasHeader(headers, "content-type")) setHeader(headers, "content-type", "application/json");
  } else {
    throw new TypeError("keygate signs the whole body: pass a string, bytes, URLSearchParams or "
      + "a plain object, not a stream or FormData");
  }
  config.data = Buffer.from(bytes);
  return bytes;
}

const ABSOLUTE = /^([a-z][a-z\d+\-.]*:)?\/\//i;

/** The target axios's Node adapter writes: the full URL parsed, then params appended. */
function targetFor(axios: AxiosLike, config: AxiosLikeConfig): string {
  const url = config.url ?? "";
  const full = ABSOLUTE.test(url) || !config.baseURL
    ? url
    : config.baseURL.replace(/\/?\/$/, "") + "/" + url.replace(/^\/+/, "");
  const parsed = new URL(full, "http://localhost");
  return axios.getUri({
    url: parsed.pathname + parsed.search,
    baseURL: "",
    params: config.params,
    paramsSerializer: config.paramsSerializer,
  });
}

export interface KeygateAxiosOptions {
  retryStale?: boolean;
  now?: () => number;
}

/**
 * Signs every request of an axios instance: `keygateAxios(axios.create({baseURL}), creds)`.
 * A request refused with `stale_timestamp` is signed again once with keygate's clock.
 */
export function keygateAxios<T extends AxiosLike>(axios: T, creds: Credentials,
                                                  opts: KeygateAxiosOptions = {}): T {
  const clock = new Clock(opts.now);
  axios.interceptors.request.use((config) => {
    const headers = config.headers ?? (config.headers = {});
    const body = bodyBytes(config, headers);
    const method = (config.method ?? "get").toUpperCase();
    const signed = signHeaders(creds, method, targetFor(axios, config), body, { now: clock.now });
    for (const [k, v] of Object.entries(signed)) setHeader(headers, k, v);
    return config;
  });
  if ((opts.retryStale ?? true) && (creds.scheme ?? "hmac-v1") === "hmac-v1") {
    axios.interceptors.response.use(undefined, (error: unknown) => {
      const e = error as { config?: AxiosLikeConfig; response?: { status: number; headers: Record<string, unknown>; data: unknown } };
      const res = e.response;
      if (!res || !e.config || e.config[RETRIED] || res.status !== 401) throw error;
      const text = typeof res.data === "string" ? res.data : JSON.stringify(res.data);
      const err = KeygateError.fromParts(res.status, res.headers, text);
      if (!err?.retryableWithFreshSignature) throw error;
      clock.correctFrom(String((res.headers as Record<string, unknown>)["date"] ?? ""));
      return axios.request({ ...e.config, [RETRIED]: true });
    });
  }
  return axios;
}

/** The KeygateError of a failed axios call, or null. */
export function keygateErrorOf(error: unknown): KeygateError | null {
  const res = (error as { response?: { status: number; headers: Record<string, unknown>; data: unknown } }).response;
  if (!res) return null;
  const text = typeof res.data === "string" ? res.data : JSON.stringify(res.data);
  return KeygateError.fromParts(res.status, res.headers, text);
}
