// Upstream side: check that a request came through keygate, unchanged, by verifying its
// x-keygate-assertion (docs/assertion.md). Needs `jose` (a peer dependency).
import type { IncomingMessage, ServerResponse } from "node:http";
import { createRemoteJWKSet, jwtVerify, type JWTPayload } from "jose";
import { createHash } from "node:crypto";

export const ASSERTION_HEADER = "x-keygate-assertion";

/** The claims keygate puts in an assertion. */
export interface KeygateClaims extends JWTPayload {
  sub: string;
  owner: string;
  scopes: string[];
  environment: "live" | "test";
  method: string;
  target: string;
  body_sha256: string;
}

export class AssertionInvalid extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AssertionInvalid";
  }
}

export interface VerifierOptions {
  /** The upstream's name in keygate's config. */
  audience: string;
  /** keygate's JWKS (Ed25519, the default), e.g. http://keygate-admin:9901/.well-known/jwks.json */
  jwksUrl?: string;
  /** The secret of an upstream with `assertion = "hs256"`. */
  hs256Secret?: string | Uint8Array;
  issuer?: string;
  clockToleranceSec?: number;
}

export class AssertionVerifier {
  private readonly key: ReturnType<typeof createRemoteJWKSet> | Uint8Array;
  private readonly alg: string;

  constructor(private readonly opts: VerifierOptions) {
    if ((opts.jwksUrl === undefined) === (opts.hs256Secret === undefined)) {
      throw new TypeError("give exactly one of jwksUrl and hs256Secret");
    }
    if (opts.jwksUrl !== undefined) {
      this.key = createRemoteJWKSet(new URL(opts.jwksUrl));
      this.alg = "EdDSA";
    } else {
      const s = opts.hs256Secret as string | Uint8Array;
      this.key = typeof s === "string" ? new TextEncoder().encode(s) : s;
      this.alg = "HS256";
    }
  }

  /** The claims, when `token` is keygate's assertion for this method, target and body. */
  async verify(token: string, method: string, target: string, body: Uint8Array): Promise<KeygateClaims> {
    let payload: JWTPayload;
    try {
      const options = {
        algorithms: [this.alg],
        audience: this.opts.audience,
        issuer: this.opts.issuer ?? "keygate",
        clockTolerance: this.opts.clockToleranceSec ?? 5,
        requiredClaims: ["exp", "iat", "jti", "sub"],
      };
      const result = this.key instanceof Uint8Array
        ? await jwtVerify(token, this.key, options)
        : await jwtVerify(token, this.key, options);
      payload = result.payload;
    } catch (e) {
      throw new AssertionInvalid(`${(e as Error).name}: ${(e as Error).message}`);
    }
    const claims = payload as KeygateClaims;
    const bodyHash = createHash("sha256").update(body).digest("hex");
    if (claims.method !== method.toUpperCase() || claims.target !== target
        || claims.body_sha256 !== bodyHash) {
      throw new AssertionInvalid("the assertion is for another request");
    }
    return claims;
  }
}

type Req = IncomingMessage & { originalUrl?: string; body?: unknown; rawBody?: Buffer; keygate?: KeygateClaims };
type Next = (err?: unknown) => void;

async function rawBody(req: Req): Promise<Buffer> {
  if (req.rawBody) return req.rawBody;
  if (Buffer.isBuffer(req.body)) return req.body;
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk));
  return Buffer.concat(chunks);
}

/**
 * Express (or connect) middleware: answers 401 problem+json to a request without a valid
 * assertion; otherwise sets `req.keygate` (the claims), `req.rawBody` (the bytes received)
 * and, for a JSON body, `req.body`, then calls `next()`. Mount it before body parsers.
 */
export function keygateAssertion(verifier: AssertionVerifier | VerifierOptions) {
  const v = verifier instanceof AssertionVerifier ? verifier : new AssertionVerifier(verifier);
  return (req: Req, res: ServerResponse, next: Next): void => {
    (async () => {
      const body = await rawBody(req);
      req.rawBody = body;
      const token = req.headers[ASSERTION_HEADER];
      if (typeof token !== "string" || token === "") {
        throw new AssertionInvalid("no x-keygate-assertion: the request did not come through keygate");
      }
      // originalUrl (Express) and url (node:http) are the target exactly as received.
      req.keygate = await v.verify(token, req.method ?? "GET", req.originalUrl ?? req.url ?? "/", body);
      if ((req.headers["content-type"] ?? "").startsWith("application/json") && body.length) {
        req.body = JSON.parse(body.toString("utf8"));
      }
    })().then(() => next(), (e: unknown) => {
      if (!(e instanceof AssertionInvalid)) return next(e);
      const doc = JSON.stringify({
        type: "urn:keygate:error:assertion_invalid", status: 401, code: "assertion_invalid",
        title: "Assertion invalid", detail: e.message,
      });
      res.statusCode = 401;
      res.setHeader("content-type", "application/problem+json");
      res.end(doc);
    });
  };
}
