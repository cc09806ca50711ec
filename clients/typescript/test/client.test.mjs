// The fetch wrapper and the axios interceptor against a local server that checks each request
// the way keygate does; tests/clients.rs runs the library against the real gateway.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { createHmac, createHash } from "node:crypto";
import axios from "axios";
import { KeygateError, keygateAxios, keygateErrorOf, keygateFetch, raiseForKeygate } from "../dist/esm/index.js";

const creds = { publicKey: "pk_test_client", secret: "sk_test_secret_text" };
const SERVER_MS = 1_800_000_000_000;

function problem(res, status, code, extra = {}) {
  res.writeHead(status, { "content-type": "application/problem+json", date: new Date(SERVER_MS).toUTCString(), ...extra });
  res.end(JSON.stringify({ type: `urn:keygate:error:${code}`, status, code, title: code, detail: `detail of ${code}`, request_id: "req-1" }));
}

async function keygate(t) {
  const seen = [];
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const h = req.headers;
      seen.push({ method: req.method, target: req.url, headers: h, body });
      if (req.url.startsWith("/limited")) return problem(res, 429, "rate_limited", { "retry-after": "7" });
      if (Math.abs(Number(h["x-api-timestamp"]) - SERVER_MS / 1000) > 300) return problem(res, 401, "stale_timestamp");
      const sts = ["KG1-HMAC-SHA256", h["x-api-timestamp"], h["x-api-nonce"], req.method, req.url,
        createHash("sha256").update(body).digest("hex")].join("\n");
      const want = createHmac("sha256", creds.secret).update(sts).digest("hex");
      if (want !== h["x-api-signature"]) return problem(res, 401, "bad_signature");
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  return { url: `http://127.0.0.1:${server.address().port}`, seen };
}

test("fetch: JSON, form, binary and a query are signed as sent", async (t) => {
  const kg = await keygate(t);
  const kfetch = keygateFetch(creds, { now: () => SERVER_MS });
  const json = JSON.stringify({ amount: "1.00", note: "café" });
  let r = await kfetch(`${kg.url}/v1/payments`, { method: "POST", body: json, headers: { "content-type": "application/json" } });
  assert.equal(r.status, 200);
  r = await kfetch(`${kg.url}/v1/forms`, { method: "POST", body: new URLSearchParams({ a: "1 2", b: "ü" }) });
  assert.equal(r.status, 200);
  r = await kfetch(`${kg.url}/v1/merchants/m%C3%BCller?x=a%20b&y=[1]`, { method: "PUT", body: new Uint8Array([0, 1, 2]) });
  assert.equal(r.status, 200);
  assert.equal(kg.seen[2].target, "/v1/merchants/m%C3%BCller?x=a%20b&y=[1]");
  assert.deepEqual(kg.seen[0].body, Buffer.from(json));
});

test("fetch: a stale timestamp is signed again once with keygate's clock", async (t) => {
  const kg = await keygate(t);
  const kfetch = keygateFetch(creds, { now: () => SERVER_MS - 3_600_000 });
  const r = await kfetch(`${kg.url}/v1/payments`, { method: "POST", body: "{}" });
  assert.equal(r.status, 200);
  assert.equal(kg.seen.length, 2);
  assert.notEqual(kg.seen[0].headers["x-api-nonce"], kg.seen[1].headers["x-api-nonce"]);
});

test("fetch: typed errors and a refused stream", async (t) => {
  const kg = await keygate(t);
  const wrong = keygateFetch({ ...creds, secret: "sk_test_wrong" }, { now: () => SERVER_MS });
  const r = await wrong(`${kg.url}/v1/x`);
  await assert.rejects(raiseForKeygate(r), (e) => e instanceof KeygateError && e.code === "bad_signature" && e.status === 401 && e.requestId === "req-1");
  const limited = await keygateFetch(creds, { now: () => SERVER_MS })(`${kg.url}/limited`);
  await assert.rejects(raiseForKeygate(limited), (e) => e.code === "rate_limited" && e.retryAfter === 7);
  await assert.rejects(keygateFetch(creds)(`${kg.url}/v1/x`, { method: "POST", body: new Blob(["x"]) }), TypeError);
});

test("axios: objects, params and baseURL are signed as sent; stale retried once", async (t) => {
  const kg = await keygate(t);
  const client = keygateAxios(axios.create({ baseURL: `${kg.url}/v1/` }), creds, { now: () => SERVER_MS - 3_600_000 });
  const r = await client.post("payments", { amount: "1.00", note: "café" }, { params: { expand: ["a b", "c"], q: "it's" } });
  assert.equal(r.status, 200);
  assert.equal(kg.seen.length, 2, "stale, then corrected");
  assert.equal(kg.seen[1].body.toString(), JSON.stringify({ amount: "1.00", note: "café" }));
  assert.match(kg.seen[1].target, /^\/v1\/payments\?/);
  const wrong = keygateAxios(axios.create({ baseURL: kg.url }), { ...creds, secret: "sk_test_wrong" }, { now: () => SERVER_MS });
  await assert.rejects(wrong.get("/v1/x"), (e) => keygateErrorOf(e)?.code === "bad_signature");
});
