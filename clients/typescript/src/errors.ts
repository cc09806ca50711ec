// keygate's problem+json answers as a typed error (docs/errors.md).

export const PROBLEM = "application/problem+json";

type HeaderSource = { get(name: string): string | null } | Record<string, unknown>;

function header(headers: HeaderSource, name: string): string | undefined {
  if (typeof (headers as { get?: unknown }).get === "function") {
    const v = (headers as { get(n: string): unknown }).get(name);
    return v === null || v === undefined ? undefined : String(v);
  }
  for (const [k, v] of Object.entries(headers)) {
    if (k.toLowerCase() === name && v !== undefined && v !== null) return String(v);
  }
  return undefined;
}

/** An error answer of keygate: `code` is stable and meant for programs. */
export class KeygateError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    readonly title: string,
    readonly detail: string,
    readonly requestId: string | undefined,
    /** Seconds, from `Retry-After` (rate_limited, too_many_failures). */
    readonly retryAfter: number | undefined,
    readonly errors: Record<string, string> = {},
  ) {
    super(`${status} ${code}: ${detail || title}`);
    this.name = "KeygateError";
  }

  get retryableWithFreshSignature(): boolean {
    return this.code === "stale_timestamp";
  }

  /** The error in an answer, or null when it is not one of keygate's. */
  static fromParts(status: number, headers: HeaderSource, body: string): KeygateError | null {
    if (status < 400) return null;
    if (!(header(headers, "content-type") ?? "").startsWith(PROBLEM)) return null;
    let doc: unknown;
    try {
      doc = JSON.parse(body);
    } catch {
      return null;
    }
    if (typeof doc !== "object" || doc === null) return null;
    const d = doc as Record<string, unknown>;
    if (typeof d.code !== "string") return null;
    const retry = header(headers, "retry-after");
    return new KeygateError(
      typeof d.status === "number" ? d.status : status,
      d.code,
      String(d.title ?? ""),
      String(d.detail ?? ""),
      typeof d.request_id === "string" ? d.request_id : header(headers, "x-request-id"),
      retry !== undefined && /^\d+$/.test(retry) ? Number(retry) : undefined,
      typeof d.errors === "object" && d.errors !== null ? (d.errors as Record<string, string>) : {},
    );
  }
}

/** Throws a KeygateError for a keygate error answer of a fetch Response (reads a clone). */
export async function raiseForKeygate(res: Response): Promise<void> {
  if (res.status < 400) return;
  const err = KeygateError.fromParts(res.status, res.headers, await res.clone().text());
  if (err) throw err;
}
