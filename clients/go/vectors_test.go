package keygate

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

type vector struct {
	Note, Scheme, Secret, Timestamp, Nonce, Method, Target string
	BodyBase64                                             string `json:"body_base64"`
	StringToSign                                           string `json:"string_to_sign"`
	Signature, Sha256                                      string
}

// Every case of keygate's tests/fixtures/signing.json.
func TestVectors(t *testing.T) {
	path := os.Getenv("KEYGATE_VECTORS")
	if path == "" {
		path = filepath.Join("..", "..", "tests", "fixtures", "signing.json")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var file struct{ Cases []vector }
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	schemes := map[string]bool{}
	for _, c := range file.Cases {
		c := c
		schemes[c.Scheme] = true
		t.Run("vector: "+c.Note, func(t *testing.T) {
			body, err := base64.StdEncoding.DecodeString(c.BodyBase64)
			if err != nil {
				t.Fatal(err)
			}
			switch c.Scheme {
			case "hmac-v1":
				if got := StringToSign(c.Timestamp, c.Nonce, c.Method, c.Target, body); got != c.StringToSign {
					t.Fatalf("string to sign:\n%q\nwant\n%q", got, c.StringToSign)
				}
				if got := V1Signature(c.Secret, c.Timestamp, c.Nonce, c.Method, c.Target, body); got != c.Signature {
					t.Fatalf("signature %s, want %s", got, c.Signature)
				}
				var ts int64
				if err := json.Unmarshal([]byte(c.Timestamp), &ts); err != nil {
					t.Fatal(err)
				}
				h, err := SignHeaders(Credentials{PublicKey: "pk_test_x", Secret: c.Secret}, c.Method, c.Target, body, time.Unix(ts, 0), c.Nonce)
				if err != nil || h["X-Api-Signature"] != c.Signature || h["X-Api-Timestamp"] != c.Timestamp {
					t.Fatalf("headers %v (%v)", h, err)
				}
			case "hmac-body":
				if got := BodySignature(c.Secret, body); got != c.Signature {
					t.Fatalf("signature %s, want %s", got, c.Signature)
				}
			case "bearer":
				sum := sha256.Sum256([]byte(c.Secret))
				if hex.EncodeToString(sum[:]) != c.Sha256 {
					t.Fatal("sha256 of the bearer secret")
				}
				h, _ := SignHeaders(Credentials{Secret: c.Secret, Scheme: Bearer}, "GET", "/", nil, time.Now(), "")
				if h["Authorization"] != "Bearer "+c.Secret {
					t.Fatalf("%v", h)
				}
			default:
				t.Fatalf("unknown scheme %s", c.Scheme)
			}
		})
	}
	if !schemes["hmac-v1"] || !schemes["hmac-body"] || !schemes["bearer"] {
		t.Fatalf("schemes %v", schemes)
	}
}
