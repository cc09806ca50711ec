package keygate

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Transport is an http.RoundTripper that signs each request with a keygate key:
//
//	client := &http.Client{Transport: &keygate.Transport{Credentials: creds}}
//
// The whole body is read, signed and sent as the same bytes; the target is the request's
// URL.RequestURI(), which is what net/http writes on the request line. net/http writes a
// query as given, so bytes RFC 3986 does not allow raw in it (space, controls, '"', '<',
// '>', '#', non-ASCII) are percent-encoded first: keygate refuses some and the HTTP parser
// in front of it rewrites others, and the signature would not match. A request refused
// with stale_timestamp is signed again once, with the clock corrected by keygate's Date
// header, and resent (NoStaleRetry turns this off).
type Transport struct {
	Credentials  Credentials
	Base         http.RoundTripper // nil: http.DefaultTransport
	Now          func() time.Time  // nil: time.Now
	NoStaleRetry bool

	mu     sync.Mutex
	offset time.Duration
}

func (t *Transport) now() time.Time {
	base := time.Now
	if t.Now != nil {
		base = t.Now
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return base().Add(t.offset)
}

func (t *Transport) correctFrom(date string) {
	server, err := http.ParseTime(date)
	if err != nil {
		return
	}
	base := time.Now
	if t.Now != nil {
		base = t.Now
	}
	t.mu.Lock()
	t.offset = server.Sub(base())
	t.mu.Unlock()
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

func (t *Transport) signed(req *http.Request, body []byte) (*http.Request, error) {
	out := req.Clone(req.Context())
	out.URL.RawQuery = wireQuery(out.URL.RawQuery)
	headers, err := SignHeaders(t.Credentials, out.Method, out.URL.RequestURI(), body, t.now(), "")
	if err != nil {
		return nil, err
	}
	for k, v := range headers {
		out.Header.Set(k, v)
	}
	out.Body = io.NopCloser(bytes.NewReader(body))
	out.ContentLength = int64(len(body))
	out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	if len(body) == 0 {
		out.Body = http.NoBody
	}
	return out, nil
}

// wireQuery percent-encodes the bytes of a raw query that are not allowed in a
// request-target and that would be rewritten or refused on the way to keygate; the others
// (including an existing %XX) are kept as they are.
func wireQuery(q string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(q); i++ {
		c := q[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == '<' || c == '>' || c == '#' {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&0xf])
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// RoundTrip signs and sends req.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		var err error
		body, err = io.ReadAll(req.Body)
		req.Body.Close()
		if err != nil {
			return nil, errors.New("keygate: reading the body to sign: " + err.Error())
		}
	}
	first, err := t.signed(req, body)
	if err != nil {
		return nil, err
	}
	resp, err := t.base().RoundTrip(first)
	if err != nil || t.NoStaleRetry || t.Credentials.scheme() != HmacV1 || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	kerr := ErrorFromResponse(resp)
	if kerr == nil || !kerr.RetryableWithFreshSignature() {
		return resp, nil
	}
	resp.Body.Close()
	t.correctFrom(resp.Header.Get("Date"))
	again, err := t.signed(req, body)
	if err != nil {
		return nil, err
	}
	return t.base().RoundTrip(again)
}
