// Sign requests for a keygate gateway and read its errors. Upstream verification of
// x-keygate-assertion lives in "@keygate/client/verify" (it needs `jose`).
export {
  type Credentials,
  type Scheme,
  type SignOptions,
  Clock,
  SCHEME_LINE,
  bodySignature,
  sha256Hex,
  signHeaders,
  stringToSign,
  targetOf,
  toBytes,
  v1Signature,
} from "./signing.js";
export { KeygateError, PROBLEM, raiseForKeygate } from "./errors.js";
export { keygateFetch, type KeygateFetchOptions } from "./fetch.js";
export { keygateAxios, keygateErrorOf, type AxiosLike, type AxiosLikeConfig, type KeygateAxiosOptions } from "./axios.js";
