// Every case of keygate's tests/fixtures/signing.json.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { bodySignature, signHeaders, stringToSign, v1Signature } from "../dist/esm/index.js";

const path = process.env.KEYGATE_VECTORS
  ?? new URL("../../../tests/fixtures/signing.json", import.meta.url);
const cases = JSON.parse(readFileSync(path, "utf8")).cases;

for (const c of cases) {
  test(`vector: ${c.note}`, () => {
    const body = Buffer.from(c.body_base64 ?? "", "base64");
    if (c.scheme === "hmac-v1") {
      assert.equal(stringToSign(c.timestamp, c.nonce, c.method, c.target, body), c.string_to_sign);
      assert.equal(v1Signature(c.secret, c.timestamp, c.nonce, c.method, c.target, body), c.signature);
      const h = signHeaders({ publicKey: "pk_test_x", secret: c.secret }, c.method, c.target, body,
        { now: () => Number(c.timestamp) * 1000, nonce: c.nonce });
      assert.equal(h["x-api-signature"], c.signature);
      assert.equal(h["x-api-timestamp"], c.timestamp);
    } else if (c.scheme === "hmac-body") {
      assert.equal(bodySignature(c.secret, body), c.signature);
      const h = signHeaders({ publicKey: "pk", secret: c.secret, scheme: "hmac-body" }, "POST", "/", body);
      assert.equal(h["x-api-signature"], c.signature);
    } else if (c.scheme === "bearer") {
      assert.equal(createHash("sha256").update(c.secret).digest("hex"), c.sha256);
      const h = signHeaders({ publicKey: "", secret: c.secret, scheme: "bearer" }, "GET", "/", body);
      assert.deepEqual(h, { authorization: `Bearer ${c.secret}` });
    } else {
      assert.fail(`unknown scheme ${c.scheme}`);
    }
  });
}

test("every scheme has a case", () => {
  assert.deepEqual(new Set(cases.map((c) => c.scheme)), new Set(["hmac-v1", "hmac-body", "bearer"]));
});
