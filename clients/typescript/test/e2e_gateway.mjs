// @keygate/client against the real keygate binary (run by keygate's tests/clients.rs, which
// starts the gateway with this script's Express app as its upstream and mints the keys).
// The upstream verifies each request's x-keygate-assertion with keygateAssertion; the cases
// sign through the fetch wrapper and the axios interceptor. Prints one line per case and
// "typescript: N cases passed"; exits 1 at the first failure.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import axios from "axios";
import express from "express";
import { KeygateError, keygateAxios, keygateErrorOf, keygateFetch, raiseForKeygate, signHeaders, toBytes } from "../dist/esm/index.js";
import { keygateAssertion } from "../dist/esm/verify.js";

const E = process.env;
const URL_ = E.KEYGATE_URL;
const v1 = { publicKey: E.KEYGATE_V1_PUBLIC_KEY, secret: E.KEYGATE_V1_SECRET };
const bodyKey = { publicKey: E.KEYGATE_BODY_PUBLIC_KEY, secret: E.KEYGATE_BODY_SECRET, scheme: "hmac-body" };
const bearer = { publicKey: "", secret: E.KEYGATE_BEARER_SECRET, scheme: "bearer" };
const limited = { publicKey: E.KEYGATE_LIMITED_PUBLIC_KEY, secret: E.KEYGATE_LIMITED_SECRET };
const sha = (b) => createHash("sha256").update(b).digest("hex");

const app = express();
app.use(keygateAssertion({ jwksUrl: E.KEYGATE_JWKS_URL, audience: E.KEYGATE_UPSTREAM_NAME }));
app.all("*", (req, res) => {
  res.json({ sub: req.keygate.sub, target: req.keygate.target, body_sha256: sha(req.rawBody), assertion: req.headers["x-keygate-assertion"] });
});
const server = await new Promise((resolve) => { const s = app.listen(Number(E.KEYGATE_UPSTREAM_PORT), "127.0.0.1", () => resolve(s)); });

let passed = 0;
async function kase(name, f) {
  try {
    await f();
  } catch (e) {
    console.log(`FAIL ${name}: ${e?.stack ?? e}`);
    process.exit(1);
  }
  console.log(`ok ${name}`);
  passed++;
}

async function seen(res, body, target) {
  await raiseForKeygate(res);
  assert.equal(res.status, 200);
  const got = await res.json();
  assert.ok(got.sub.startsWith("key_"), JSON.stringify(got));
  assert.equal(got.target, target);
  assert.equal(got.body_sha256, sha(body));
  return got;
}

const kfetch = keygateFetch(v1);

await kase("fetch: signed POST with a JSON body, verified upstream", async () => {
  const body = JSON.stringify({ amount: "1.00", currency: "EUR", note: "café" });
  const got = await seen(await kfetch(`${URL_}/v1/payments`, { method: "POST", body, headers: { "content-type": "application/json" } }), body, "/v1/payments");
  assert.equal(got.sub, E.KEYGATE_V1_ID);
});

await kase("fetch: GET with a query, exact target upstream", async () => {
  await seen(await kfetch(`${URL_}/v1/payments/pay_123?expand=customer&limit=10`), "", "/v1/payments/pay_123?expand=customer&limit=10");
});

await kase("fetch: a replayed request is refused with replayed_nonce", async () => {
  const body = '{"amount":"2.00"}';
  const headers = { ...signHeaders(v1, "POST", "/v1/payments", toBytes(body)), "content-type": "application/json" };
  const first = await fetch(`${URL_}/v1/payments`, { method: "POST", body, headers });
  assert.equal(first.status, 200);
  const again = await fetch(`${URL_}/v1/payments`, { method: "POST", body, headers });
  await assert.rejects(raiseForKeygate(again), (e) => e instanceof KeygateError && e.status === 401
    && e.code === "replayed_nonce" && e.requestId === again.headers.get("x-request-id"));
});

await kase("fetch: a wrong secret is a typed bad_signature", async () => {
  const wrong = keygateFetch({ ...v1, secret: v1.secret.slice(0, -1) + (v1.secret.endsWith("A") ? "B" : "A") });
  const r = await wrong(`${URL_}/v1/payments`, { method: "POST", body: '{"amount":"3.00"}' });
  await assert.rejects(raiseForKeygate(r), (e) => e.code === "bad_signature" && e.status === 401 && Boolean(e.requestId));
});

await kase("fetch: a client clock an hour slow is corrected once from keygate's Date", async () => {
  const slow = keygateFetch(v1, { now: () => Date.now() - 3_600_000 });
  const body = '{"amount":"4.00"}';
  await seen(await slow(`${URL_}/v1/payments`, { method: "POST", body }), body, "/v1/payments");
});

await kase("fetch: rate_limited exposes Retry-After", async () => {
  const f = keygateFetch(limited);
  assert.equal((await f(`${URL_}/v1/payments`, { method: "POST", body: '{"n":1}' })).status, 200);
  const r = await f(`${URL_}/v1/payments`, { method: "POST", body: '{"n":2}' });
  await assert.rejects(raiseForKeygate(r), (e) => e.code === "rate_limited" && e.status === 429 && e.retryAfter > 0);
});

await kase("axios: signed POST of an object and GET with params", async () => {
  const client = keygateAxios(axios.create({ baseURL: URL_ }), v1);
  const body = { amount: "5.00", note: "ü" };
  let r = await client.post("/v1/payments", body);
  assert.equal(r.data.body_sha256, sha(JSON.stringify(body)));
  r = await client.get("/v1/payments/pay_9", { params: { limit: 1, expand: "customer" } });
  assert.equal(r.data.target, "/v1/payments/pay_9?limit=1&expand=customer");
  const wrong = keygateAxios(axios.create({ baseURL: URL_ }), { ...v1, secret: "sk_test_wrong" });
  await assert.rejects(wrong.post("/v1/payments", body), (e) => keygateErrorOf(e)?.code === "bad_signature");
});

await kase("hmac-body and bearer keys", async () => {
  const body = JSON.stringify({ amount: "7.00", nonce: 1 });
  await seen(await keygateFetch(bodyKey)(`${URL_}/v1/payments`, { method: "POST", body }), body, "/v1/payments");
  await seen(await keygateFetch(bearer)(`${URL_}/v1/payments`, { method: "POST", body: "{}" }), "{}", "/v1/payments");
});

await kase("upstream: a request that bypasses keygate is refused by the middleware", async () => {
  const direct = `http://127.0.0.1:${E.KEYGATE_UPSTREAM_PORT}/v1/payments`;
  let r = await fetch(direct, { method: "POST", body: "{}", headers: { "x-keygate-key-id": E.KEYGATE_V1_ID } });
  assert.equal(r.status, 401);
  assert.equal((await r.json()).code, "assertion_invalid");
  const ok = await kfetch(`${URL_}/v1/payments`, { method: "POST", body: '{"amount":"1"}' });
  const { assertion } = await seen(ok, '{"amount":"1"}', "/v1/payments");
  r = await fetch(direct, { method: "POST", body: '{"amount":"1000000"}', headers: { "x-keygate-assertion": assertion } });
  assert.equal(r.status, 401);
  assert.match((await r.json()).detail, /another request/);
});

console.log(`typescript: ${passed} cases passed`);
server.close();
