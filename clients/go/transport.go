package keygate

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"
)

// Transport is an http.RoundTripper that signs each request with a keygate key:
//
//	client := &http.Client{Transport: &keygate.Transport{Credentials: creds}}
//
// The whole body is read, signed and sent as the same bytes; the target is the request's
// URL.RequestURI(), which is what net/http writes on the request line. A request refused
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
	headers, err := SignHeaders(t.Credentials, req.Method, req.URL.RequestURI(), body, t.now(), "")
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
