package keygate

import (
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func token(t *testing.T, alg, kid string, claims map[string]interface{}, sign func([]byte) []byte) string {
	h, _ := json.Marshal(map[string]string{"alg": alg, "kid": kid, "typ": "JWT"})
	c, _ := json.Marshal(claims)
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	return input + "." + base64.RawURLEncoding.EncodeToString(sign([]byte(input)))
}

func claimsFor(method, target string, body []byte) map[string]interface{} {
	now := time.Now().Unix()
	return map[string]interface{}{
		"iss": "keygate", "aud": "payments", "iat": now, "exp": now + 60, "jti": "req-1",
		"sub": "key_1", "owner": "acme", "scopes": []string{"payments.*"}, "environment": "test",
		"method": method, "target": target, "body_sha256": sha256Hex(body),
	}
}

func TestMiddlewareAcceptsOnlyKeygatesAssertionForThisRequest(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]interface{}{"keys": []map[string]string{{
			"kty": "OKP", "crv": "Ed25519", "kid": "kg-1", "x": base64.RawURLEncoding.EncodeToString(pub)}}})
	}))
	defer jwks.Close()
	app := Middleware(&Verifier{Audience: "payments", JWKSURL: jwks.URL}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _ := ClaimsFrom(r.Context())
		body, _ := io.ReadAll(r.Body)
		io.WriteString(w, c.Subject+" "+c.Owner+" "+string(body))
	}))
	upstream := httptest.NewServer(app)
	defer upstream.Close()
	sign := func(b []byte) []byte { return ed25519.Sign(priv, b) }
	body := []byte(`{"amount":"1.00"}`)
	good := token(t, "EdDSA", "kg-1", claimsFor("POST", "/v1/payments?x=1", body), sign)

	send := func(tok string, body []byte) (int, string) {
		req, _ := http.NewRequest("POST", upstream.URL+"/v1/payments?x=1", strings.NewReader(string(body)))
		if tok != "" {
			req.Header.Set(AssertionHeader, tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(out)
	}
	if code, out := send(good, body); code != 200 || out != `key_1 acme {"amount":"1.00"}` {
		t.Fatalf("%d %s", code, out)
	}
	for name, c := range map[string]struct {
		tok  string
		body []byte
	}{
		"no assertion": {"", body},
		"another body": {good, []byte(`{"amount":"1000"}`)},
		"another key":  {token(t, "EdDSA", "kg-1", claimsFor("POST", "/v1/payments?x=1", body), func(b []byte) []byte { _, p, _ := ed25519.GenerateKey(rand.Reader); return ed25519.Sign(p, b) }), body},
		"another audience": {token(t, "EdDSA", "kg-1", func() map[string]interface{} {
			m := claimsFor("POST", "/v1/payments?x=1", body)
			m["aud"] = "ledger"
			return m
		}(), sign), body},
		"expired": {token(t, "EdDSA", "kg-1", func() map[string]interface{} {
			m := claimsFor("POST", "/v1/payments?x=1", body)
			m["exp"] = time.Now().Unix() - 60
			return m
		}(), sign), body},
		"an alg of its own": {token(t, "none", "kg-1", claimsFor("POST", "/v1/payments?x=1", body), func([]byte) []byte { return nil }), body},
	} {
		if code, out := send(c.tok, c.body); code != 401 || !strings.Contains(out, "assertion_invalid") {
			t.Fatalf("%s: %d %s", name, code, out)
		}
	}
}

func TestHS256Assertions(t *testing.T) {
	secret := []byte("a secret shared with this upstream, 32+ bytes long")
	v := &Verifier{Audience: "payments", HS256Secret: secret}
	sign := func(b []byte) []byte { m := hmac.New(sha256.New, secret); m.Write(b); return m.Sum(nil) }
	tok := token(t, "HS256", "", claimsFor("GET", "/v1/x", nil), sign)
	if c, err := v.Verify(tok, "GET", "/v1/x", nil); err != nil || c.Subject != "key_1" {
		t.Fatalf("%v %v", c, err)
	}
	if _, err := v.Verify(tok, "GET", "/v1/y", nil); err == nil {
		t.Fatal("another target passed")
	}
}
