// Command e2e runs the Go library against the real keygate binary (keygate's
// tests/clients.rs starts the gateway with this program's net/http server as its upstream
// and mints the keys). The upstream verifies each request's x-keygate-assertion with
// keygate.Middleware; the cases sign through keygate.Transport. Prints one line per case and
// "go: N cases passed"; exits 1 at the first failure.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	keygate "github.com/keygate/keygate/clients/go"
)

var (
	env     = os.Getenv
	base    = env("KEYGATE_URL")
	v1      = keygate.Credentials{PublicKey: env("KEYGATE_V1_PUBLIC_KEY"), Secret: env("KEYGATE_V1_SECRET")}
	bodyKey = keygate.Credentials{PublicKey: env("KEYGATE_BODY_PUBLIC_KEY"), Secret: env("KEYGATE_BODY_SECRET"), Scheme: keygate.HmacBody}
	bearer  = keygate.Credentials{Secret: env("KEYGATE_BEARER_SECRET"), Scheme: keygate.Bearer}
	limited = keygate.Credentials{PublicKey: env("KEYGATE_LIMITED_PUBLIC_KEY"), Secret: env("KEYGATE_LIMITED_SECRET")}
	passed  = 0
)

type echoed struct {
	Sub, Target, Assertion string
	BodySHA256             string `json:"body_sha256"`
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func client(c keygate.Credentials) *http.Client {
	return &http.Client{Transport: &keygate.Transport{Credentials: c}, Timeout: 10 * time.Second}
}

func check(name string, f func() error) {
	if err := f(); err != nil {
		fmt.Printf("FAIL %s: %v\n", name, err)
		os.Exit(1)
	}
	fmt.Printf("ok %s\n", name)
	passed++
}

// seen reads what the upstream verified, and checks it was this target and body.
func seen(resp *http.Response, err error, body []byte, target string) (echoed, error) {
	var got echoed
	if err != nil {
		return got, err
	}
	defer resp.Body.Close()
	if kerr := keygate.ErrorFromResponse(resp); kerr != nil {
		return got, kerr
	}
	if resp.StatusCode != 200 {
		return got, fmt.Errorf("status %d", resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		return got, err
	}
	if !strings.HasPrefix(got.Sub, "key_") || got.Target != target || got.BodySHA256 != sha(body) {
		return got, fmt.Errorf("upstream saw %+v", got)
	}
	return got, nil
}

func refused(resp *http.Response, err error, status int, code string) (*keygate.Error, error) {
	if err != nil {
		return nil, err
	}
	kerr := keygate.ErrorFromResponse(resp)
	if kerr == nil || kerr.Status != status || kerr.Code != code {
		return kerr, fmt.Errorf("got %d %+v, want %d %s", resp.StatusCode, kerr, status, code)
	}
	return kerr, nil
}

func main() {
	verifier := &keygate.Verifier{Audience: env("KEYGATE_UPSTREAM_NAME"), JWKSURL: env("KEYGATE_JWKS_URL")}
	upstream := keygate.Middleware(verifier, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _ := keygate.ClaimsFrom(r.Context())
		body, _ := io.ReadAll(r.Body)
		json.NewEncoder(w).Encode(map[string]string{"sub": c.Subject, "target": c.Target,
			"body_sha256": sha(body), "assertion": r.Header.Get(keygate.AssertionHeader)})
	}))
	ln, err := net.Listen("tcp", "127.0.0.1:"+env("KEYGATE_UPSTREAM_PORT"))
	if err != nil {
		fmt.Println("FAIL upstream:", err)
		os.Exit(1)
	}
	go http.Serve(ln, upstream)
	kc := client(v1)

	post := func(c *http.Client, body string) (*http.Response, error) {
		return c.Post(base+"/v1/payments", "application/json", strings.NewReader(body))
	}

	check("net/http: signed POST with a JSON body, verified upstream", func() error {
		body := `{"amount":"1.00","currency":"EUR","note":"café"}`
		resp, err := post(kc, body)
		got, err := seen(resp, err, []byte(body), "/v1/payments")
		if err == nil && got.Sub != env("KEYGATE_V1_ID") {
			err = fmt.Errorf("sub %s", got.Sub)
		}
		return err
	})
	check("net/http: GET with a query, exact target upstream", func() error {
		resp, err := kc.Get(base + "/v1/payments/pay_123?expand=customer&limit=10")
		_, err = seen(resp, err, nil, "/v1/payments/pay_123?expand=customer&limit=10")
		return err
	})
	check("net/http: a replayed request is refused with replayed_nonce", func() error {
		body := `{"amount":"2.00"}`
		h, _ := keygate.SignHeaders(v1, "POST", "/v1/payments", []byte(body), time.Now(), "")
		send := func() (*http.Response, error) {
			req, _ := http.NewRequest("POST", base+"/v1/payments", strings.NewReader(body))
			for k, v := range h {
				req.Header.Set(k, v)
			}
			return http.DefaultClient.Do(req)
		}
		resp, err := send()
		if _, err := seen(resp, err, []byte(body), "/v1/payments"); err != nil {
			return err
		}
		resp, err = send()
		kerr, err := refused(resp, err, 401, "replayed_nonce")
		if err == nil && kerr.RequestID != resp.Header.Get("X-Request-Id") {
			err = fmt.Errorf("request id %q", kerr.RequestID)
		}
		return err
	})
	check("net/http: a wrong secret is a typed bad_signature", func() error {
		wrong := v1
		wrong.Secret = v1.Secret[:len(v1.Secret)-1] + "#"
		resp, err := post(client(wrong), `{"amount":"3.00"}`)
		_, err = refused(resp, err, 401, "bad_signature")
		return err
	})
	check("net/http: a client clock an hour slow is corrected once from keygate's Date", func() error {
		tr := &keygate.Transport{Credentials: v1, Now: func() time.Time { return time.Now().Add(-time.Hour) }}
		body := `{"amount":"4.00"}`
		resp, err := post(&http.Client{Transport: tr}, body)
		_, err = seen(resp, err, []byte(body), "/v1/payments")
		return err
	})
	check("net/http: rate_limited exposes Retry-After", func() error {
		lc := client(limited)
		resp, err := post(lc, `{"n":1}`)
		if _, err := seen(resp, err, []byte(`{"n":1}`), "/v1/payments"); err != nil {
			return err
		}
		resp, err = post(lc, `{"n":2}`)
		kerr, err := refused(resp, err, 429, "rate_limited")
		if err == nil && kerr.RetryAfter <= 0 {
			err = fmt.Errorf("retry after %d", kerr.RetryAfter)
		}
		return err
	})
	check("hmac-body and bearer keys", func() error {
		body := `{"amount":"7.00","nonce":1}`
		resp, err := post(client(bodyKey), body)
		if _, err := seen(resp, err, []byte(body), "/v1/payments"); err != nil {
			return err
		}
		resp, err = post(client(bearer), "{}")
		_, err = seen(resp, err, []byte("{}"), "/v1/payments")
		return err
	})
	check("upstream: a request that bypasses keygate is refused by the middleware", func() error {
		direct := "http://" + ln.Addr().String() + "/v1/payments"
		req, _ := http.NewRequest("POST", direct, strings.NewReader("{}"))
		req.Header.Set("X-Keygate-Key-Id", env("KEYGATE_V1_ID"))
		resp, err := http.DefaultClient.Do(req)
		if _, err := refused(resp, err, 401, "assertion_invalid"); err != nil {
			return err
		}
		resp, err = post(kc, `{"amount":"1"}`)
		got, err := seen(resp, err, []byte(`{"amount":"1"}`), "/v1/payments")
		if err != nil {
			return err
		}
		req, _ = http.NewRequest("POST", direct, strings.NewReader(`{"amount":"1000000"}`))
		req.Header.Set(keygate.AssertionHeader, got.Assertion)
		resp, err = http.DefaultClient.Do(req)
		kerr, err := refused(resp, err, 401, "assertion_invalid")
		if err == nil && !strings.Contains(kerr.Detail, "another request") {
			err = fmt.Errorf("detail %q", kerr.Detail)
		}
		return err
	})
	fmt.Printf("go: %d cases passed\n", passed)
}
