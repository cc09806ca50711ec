package keygate

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// AssertionHeader carries keygate's signed statement about the request it forwards.
const AssertionHeader = "X-Keygate-Assertion"

// Claims are what keygate asserts about a forwarded request (docs/assertion.md).
type Claims struct {
	Issuer      string   `json:"iss"`
	Audience    audience `json:"aud"`
	IssuedAt    int64    `json:"iat"`
	Expiry      int64    `json:"exp"`
	ID          string   `json:"jti"`
	Subject     string   `json:"sub"` // the key id
	Owner       string   `json:"owner"`
	Scopes      []string `json:"scopes"`
	Environment string   `json:"environment"`
	Method      string   `json:"method"`
	Target      string   `json:"target"`
	BodySHA256  string   `json:"body_sha256"`
}

type audience []string

func (a *audience) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*a = audience{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*a = many
	return nil
}

// ErrAssertion wraps every reason an assertion is refused.
var ErrAssertion = errors.New("keygate assertion invalid")

func invalid(format string, args ...interface{}) error {
	return fmt.Errorf("%w: %s", ErrAssertion, fmt.Sprintf(format, args...))
}

// Verifier checks assertions signed with the fleet's Ed25519 key (JWKSURL, fetched and
// cached; fetched again for an unknown kid) or with an HS256 secret shared with this upstream.
type Verifier struct {
	Audience    string // the upstream's name in keygate's config
	JWKSURL     string
	HS256Secret []byte
	Issuer      string        // default "keygate"
	Leeway      time.Duration // default 5 s
	Client      *http.Client  // default http.DefaultClient
	Now         func() time.Time

	mu      sync.Mutex
	keys    map[string]ed25519.PublicKey
	fetched time.Time
}

func (v *Verifier) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

func (v *Verifier) key(kid string) (ed25519.PublicKey, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if k, ok := v.keys[kid]; ok {
		return k, nil
	}
	// An unknown kid may be a key published since: fetch again, at most every 5 s.
	if !v.fetched.IsZero() && v.now().Sub(v.fetched) < 5*time.Second {
		return nil, invalid("unknown key id %q", kid)
	}
	client := v.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Get(v.JWKSURL)
	if err != nil {
		return nil, fmt.Errorf("keygate: fetching the JWKS: %w", err)
	}
	defer resp.Body.Close()
	var set struct {
		Keys []struct {
			Kty, Crv, X, Kid string
		} `json:"keys"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&set); err != nil {
		return nil, fmt.Errorf("keygate: reading the JWKS: %w", err)
	}
	v.keys = map[string]ed25519.PublicKey{}
	for _, k := range set.Keys {
		x, err := base64.RawURLEncoding.DecodeString(k.X)
		if k.Kty == "OKP" && k.Crv == "Ed25519" && err == nil && len(x) == ed25519.PublicKeySize {
			v.keys[k.Kid] = ed25519.PublicKey(x)
		}
	}
	v.fetched = v.now()
	if k, ok := v.keys[kid]; ok {
		return k, nil
	}
	return nil, invalid("unknown key id %q", kid)
}

// Verify returns the claims when token is keygate's assertion for exactly this method,
// target and body.
func (v *Verifier) Verify(token, method, target string, body []byte) (*Claims, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, invalid("not a compact JWS")
	}
	var header struct{ Alg, Kid string }
	raw, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil || json.Unmarshal(raw, &header) != nil {
		return nil, invalid("unreadable header")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return nil, invalid("unreadable signature")
	}
	input := []byte(parts[0] + "." + parts[1])
	switch {
	case v.HS256Secret != nil:
		if header.Alg != "HS256" {
			return nil, invalid("alg %q, want HS256", header.Alg)
		}
		m := hmac.New(sha256.New, v.HS256Secret)
		m.Write(input)
		if !hmac.Equal(m.Sum(nil), sig) {
			return nil, invalid("bad signature")
		}
	case v.JWKSURL != "":
		if header.Alg != "EdDSA" {
			return nil, invalid("alg %q, want EdDSA", header.Alg)
		}
		pub, err := v.key(header.Kid)
		if err != nil {
			return nil, err
		}
		if !ed25519.Verify(pub, input, sig) {
			return nil, invalid("bad signature")
		}
	default:
		return nil, errors.New("keygate: a Verifier needs JWKSURL or HS256Secret")
	}
	raw, err = base64.RawURLEncoding.DecodeString(parts[1])
	var c Claims
	if err != nil || json.Unmarshal(raw, &c) != nil {
		return nil, invalid("unreadable claims")
	}
	issuer, leeway := v.Issuer, v.Leeway
	if issuer == "" {
		issuer = "keygate"
	}
	if leeway == 0 {
		leeway = 5 * time.Second
	}
	now := v.now()
	switch {
	case c.Expiry == 0 || c.IssuedAt == 0 || c.ID == "" || c.Subject == "":
		return nil, invalid("exp, iat, jti and sub are required")
	case c.Issuer != issuer:
		return nil, invalid("issuer %q", c.Issuer)
	case !contains(c.Audience, v.Audience):
		return nil, invalid("audience %v, want %q", []string(c.Audience), v.Audience)
	case now.Add(-leeway).Unix() >= c.Expiry:
		return nil, invalid("expired")
	case now.Add(leeway).Unix() < c.IssuedAt:
		return nil, invalid("issued in the future")
	}
	bodyHash := sha256Hex(body)
	if c.Method != strings.ToUpper(method) || c.Target != target || c.BodySHA256 != bodyHash {
		return nil, invalid("the assertion is for another request")
	}
	return &c, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

type claimsKey struct{}

// ClaimsFrom returns the claims Middleware verified for a request.
func ClaimsFrom(ctx context.Context) (*Claims, bool) {
	c, ok := ctx.Value(claimsKey{}).(*Claims)
	return c, ok
}

// Middleware answers 401 problem+json to a request without a valid assertion; otherwise it
// passes the request on with the claims in its context (ClaimsFrom) and the body intact.
func Middleware(v *Verifier, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		r.Body.Close()
		if err != nil {
			http.Error(w, "cannot read the body", http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		token := r.Header.Get(AssertionHeader)
		var claims *Claims
		if token == "" {
			err = invalid("no x-keygate-assertion: the request did not come through keygate")
		} else {
			// RequestURI is the target exactly as received.
			claims, err = v.Verify(token, r.Method, r.RequestURI, body)
		}
		if err != nil {
			doc, _ := json.Marshal(map[string]interface{}{
				"type": "urn:keygate:error:assertion_invalid", "status": 401,
				"code": "assertion_invalid", "title": "Assertion invalid", "detail": err.Error(),
			})
			w.Header().Set("Content-Type", Problem)
			w.WriteHeader(http.StatusUnauthorized)
			w.Write(doc)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), claimsKey{}, claims)))
	})
}
