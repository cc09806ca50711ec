package keygate

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var creds = Credentials{PublicKey: "pk_test_client", Secret: "sk_test_secret_text"}
var serverTime = time.Unix(1_800_000_000, 0)

type seen struct {
	method, target string
	header         http.Header
	body           []byte
}

// A server that checks each request the way keygate does; keygate's tests/clients.rs runs
// the library against the real gateway.
func fakeKeygate(t *testing.T) (*httptest.Server, *[]seen) {
	var mu sync.Mutex
	var log []seen
	problem := func(w http.ResponseWriter, status int, code string) {
		w.Header().Set("Content-Type", Problem)
		w.Header().Set("Date", serverTime.UTC().Format(http.TimeFormat))
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(status)
		io.WriteString(w, `{"status":`+strconv.Itoa(status)+`,"code":"`+code+`","title":"t","detail":"d","request_id":"req-1"}`)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		log = append(log, seen{r.Method, r.RequestURI, r.Header.Clone(), body})
		mu.Unlock()
		ts, _ := strconv.ParseInt(r.Header.Get("X-Api-Timestamp"), 10, 64)
		if d := ts - serverTime.Unix(); d > 300 || d < -300 {
			problem(w, 401, "stale_timestamp")
			return
		}
		m := hmac.New(sha256.New, []byte(creds.Secret))
		m.Write([]byte(StringToSign(r.Header.Get("X-Api-Timestamp"), r.Header.Get("X-Api-Nonce"), r.Method, r.RequestURI, body)))
		if hex.EncodeToString(m.Sum(nil)) != r.Header.Get("X-Api-Signature") {
			problem(w, 401, "bad_signature")
			return
		}
		io.WriteString(w, "{}")
	}))
	t.Cleanup(srv.Close)
	return srv, &log
}

func TestTransportSignsWhatItSends(t *testing.T) {
	srv, log := fakeKeygate(t)
	c := &http.Client{Transport: &Transport{Credentials: creds, Now: func() time.Time { return serverTime }}}
	body := `{"amount":"1.00","note":"café"}`
	resp, err := c.Post(srv.URL+"/v1/payments", "application/json", strings.NewReader(body))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	resp, err = c.Get(srv.URL + "/v1/merchants/m%C3%BCller?x=a%20b&y=[1]")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	if (*log)[1].target != "/v1/merchants/m%C3%BCller?x=a%20b&y=[1]" || string((*log)[0].body) != body {
		t.Fatalf("%+v", *log)
	}
}

func TestTransportEncodesRawQueryBytesBeforeSigning(t *testing.T) {
	srv, log := fakeKeygate(t)
	c := &http.Client{Transport: &Transport{Credentials: creds, Now: func() time.Time { return serverTime }}}
	req, err := http.NewRequest("GET", srv.URL+"/v1/search", nil)
	if err != nil {
		t.Fatal(err)
	}
	// As a caller may set it; net/http would write it on the request line as is.
	req.URL.RawQuery = "q=a b&name=café&x=\"<>\"&y=[1]&z=%20"
	resp, err := c.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	want := "/v1/search?q=a%20b&name=caf%C3%A9&x=%22%3C%3E%22&y=[1]&z=%20"
	if got := (*log)[0].target; got != want {
		t.Fatalf("sent %q, want %q", got, want)
	}
	if req.URL.RawQuery != "q=a b&name=café&x=\"<>\"&y=[1]&z=%20" {
		t.Fatal("the caller's request was changed")
	}
}

func TestTransportRetriesAStaleTimestampOnceWithKeygatesClock(t *testing.T) {
	srv, log := fakeKeygate(t)
	tr := &Transport{Credentials: creds, Now: func() time.Time { return serverTime.Add(-time.Hour) }}
	resp, err := (&http.Client{Transport: tr}).Post(srv.URL+"/v1/payments", "application/json", strings.NewReader("{}"))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	if len(*log) != 2 || (*log)[0].header.Get("X-Api-Nonce") == (*log)[1].header.Get("X-Api-Nonce") {
		t.Fatalf("%+v", *log)
	}
	if string((*log)[1].body) != "{}" {
		t.Fatal("the retry lost the body")
	}
}

func TestTypedErrors(t *testing.T) {
	srv, log := fakeKeygate(t)
	wrong := Credentials{PublicKey: creds.PublicKey, Secret: "sk_test_wrong"}
	resp, err := (&http.Client{Transport: &Transport{Credentials: wrong, Now: func() time.Time { return serverTime }}}).Get(srv.URL + "/v1/x")
	if err != nil {
		t.Fatal(err)
	}
	kerr := ErrorFromResponse(resp)
	if kerr == nil || kerr.Code != "bad_signature" || kerr.Status != 401 || kerr.RequestID != "req-1" || kerr.RetryAfter != 7 {
		t.Fatalf("%+v", kerr)
	}
	var asErr error = kerr
	var target *Error
	if !errors.As(asErr, &target) || len(*log) != 1 {
		t.Fatal("one attempt, a typed error")
	}
	if ParseError(502, http.Header{"Content-Type": {"text/html"}}, []byte("<html>")) != nil {
		t.Fatal("not keygate's")
	}
	if strings.Contains(creds.String(), creds.Secret) {
		t.Fatal("the secret is shown")
	}
}
