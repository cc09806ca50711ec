// The CommonJS build loads with require() and signs like the ESM one.
const { test } = require("node:test");
const assert = require("node:assert/strict");
const { readFileSync } = require("node:fs");
const path = require("node:path");
const kg = require("../dist/cjs/index.js");

test("require() gives the same signing functions", () => {
  const file = process.env.KEYGATE_VECTORS
    ?? path.join(__dirname, "../../../tests/fixtures/signing.json");
  const c = JSON.parse(readFileSync(file, "utf8")).cases.find((x) => x.scheme === "hmac-v1");
  const body = Buffer.from(c.body_base64 ?? "", "base64");
  assert.equal(kg.v1Signature(c.secret, c.timestamp, c.nonce, c.method, c.target, body), c.signature);
  assert.equal(typeof kg.keygateFetch, "function");
  assert.equal(typeof kg.keygateAxios, "function");
});
