// Package keygate signs requests for a keygate gateway (hmac-v1, hmac-body and bearer keys),
// reads its problem+json errors, and lets an upstream verify x-keygate-assertion. It uses the
// standard library only.
package keygate

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Scheme is how a key authenticates requests.
type Scheme string

const (
	HmacV1   Scheme = "hmac-v1"
	HmacBody Scheme = "hmac-body"
	Bearer   Scheme = "bearer"
)

// SchemeLine is the first line of an hmac-v1 string to sign.
const SchemeLine = "KG1-HMAC-SHA256"

// Credentials is a keygate key. An empty Scheme means hmac-v1.
type Credentials struct {
	PublicKey string
	Secret    string
	Scheme    Scheme
}

// String never shows the secret.
func (c Credentials) String() string {
	return fmt.Sprintf("keygate.Credentials{PublicKey: %q, Scheme: %q, Secret: ***}", c.PublicKey, c.scheme())
}

func (c Credentials) scheme() Scheme {
	if c.Scheme == "" {
		return HmacV1
	}
	return c.Scheme
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// The secret is used as text (its UTF-8 bytes), whatever it looks like.
func hmacHex(secret string, message []byte) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(message)
	return hex.EncodeToString(m.Sum(nil))
}

// StringToSign is the six lines an hmac-v1 signature covers, joined by LF, no trailing LF.
func StringToSign(timestamp, nonce, method, target string, body []byte) string {
	return strings.Join([]string{SchemeLine, timestamp, nonce, strings.ToUpper(method), target, sha256Hex(body)}, "\n")
}

// V1Signature is the hmac-v1 signature of a request.
func V1Signature(secret, timestamp, nonce, method, target string, body []byte) string {
	return hmacHex(secret, []byte(StringToSign(timestamp, nonce, method, target, body)))
}

// BodySignature is the hmac-body signature: the HMAC of the raw body bytes.
func BodySignature(secret string, body []byte) string {
	return hmacHex(secret, body)
}

// NewNonce is a random UUID (version 4).
func NewNonce() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("keygate: no randomness: " + err.Error())
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// SignHeaders returns the headers that authenticate one request: target is the path and
// query exactly as sent on the request line, body the exact bytes sent. An empty nonce
// means a fresh one: sign every attempt anew.
func SignHeaders(c Credentials, method, target string, body []byte, now time.Time, nonce string) (map[string]string, error) {
	switch c.scheme() {
	case Bearer:
		return map[string]string{"Authorization": "Bearer " + c.Secret}, nil
	case HmacBody:
		return map[string]string{"X-Api-Public-Key": c.PublicKey, "X-Api-Signature": BodySignature(c.Secret, body)}, nil
	case HmacV1:
		if nonce == "" {
			nonce = NewNonce()
		}
		ts := strconv.FormatInt(now.Unix(), 10)
		return map[string]string{
			"X-Api-Public-Key": c.PublicKey,
			"X-Api-Timestamp":  ts,
			"X-Api-Nonce":      nonce,
			"X-Api-Signature":  V1Signature(c.Secret, ts, nonce, method, target, body),
		}, nil
	default:
		return nil, fmt.Errorf("keygate: unknown scheme %q", c.Scheme)
	}
}
