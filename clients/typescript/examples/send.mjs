// Send one signed request to keygate and print the status code on the last line.
//
//   KEYGATE_URL=http://127.0.0.1:8080 KEYGATE_PUBLIC_KEY=pk_test_… KEYGATE_SECRET=sk_test_… \
//     node examples/send.mjs
//
// Optional: KEYGATE_METHOD (POST), KEYGATE_TARGET (/v1/payments), KEYGATE_BODY
// ({"amount":"1.00"}; empty for none), KEYGATE_SCHEME (hmac-v1, hmac-body or bearer).
// Exits 0 on a 2xx answer, 1 otherwise. Run `npm run build` first.
import { KeygateError, keygateFetch } from "../dist/esm/index.js";

const env = process.env;
const creds = { publicKey: env.KEYGATE_PUBLIC_KEY, secret: env.KEYGATE_SECRET, scheme: env.KEYGATE_SCHEME ?? "hmac-v1" };
const method = (env.KEYGATE_METHOD ?? "POST").toUpperCase();
const target = env.KEYGATE_TARGET ?? "/v1/payments";
const body = env.KEYGATE_BODY ?? '{"amount":"1.00"}';
const res = await keygateFetch(creds)(env.KEYGATE_URL.replace(/\/$/, "") + target, {
  method,
  body: body === "" ? undefined : body,
  headers: body === "" ? {} : { "content-type": "application/json" },
});
const text = await res.text();
const err = KeygateError.fromParts(res.status, res.headers, text);
if (err) console.log(`keygate refused it: ${err.code} (${err.detail}), request id ${err.requestId}`);
console.log(text);
console.log(res.status);
process.exit(res.status >= 200 && res.status < 300 ? 0 : 1);
