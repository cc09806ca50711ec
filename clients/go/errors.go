package keygate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// Problem is the media type of keygate's error answers.
const Problem = "application/problem+json"

// Error is an error answer of keygate: Code is stable and meant for programs.
type Error struct {
	Status     int
	Code       string
	Title      string
	Detail     string
	RequestID  string
	RetryAfter int // seconds, from Retry-After (0 when absent)
	Errors     map[string]string
}

func (e *Error) Error() string {
	d := e.Detail
	if d == "" {
		d = e.Title
	}
	return fmt.Sprintf("keygate: %d %s: %s", e.Status, e.Code, d)
}

// RetryableWithFreshSignature tells a stale_timestamp refusal.
func (e *Error) RetryableWithFreshSignature() bool { return e.Code == "stale_timestamp" }

// ParseError returns the keygate error in an answer, or nil when it is not one.
func ParseError(status int, header http.Header, body []byte) *Error {
	if status < 400 || !strings.HasPrefix(header.Get("Content-Type"), Problem) {
		return nil
	}
	var doc struct {
		Status    int               `json:"status"`
		Code      string            `json:"code"`
		Title     string            `json:"title"`
		Detail    string            `json:"detail"`
		RequestID string            `json:"request_id"`
		Errors    map[string]string `json:"errors"`
	}
	if err := json.Unmarshal(body, &doc); err != nil || doc.Code == "" {
		return nil
	}
	e := &Error{Status: doc.Status, Code: doc.Code, Title: doc.Title, Detail: doc.Detail,
		RequestID: doc.RequestID, Errors: doc.Errors}
	if e.Status == 0 {
		e.Status = status
	}
	if e.RequestID == "" {
		e.RequestID = header.Get("X-Request-Id")
	}
	if n, err := strconv.Atoi(header.Get("Retry-After")); err == nil {
		e.RetryAfter = n
	}
	return e
}

// ErrorFromResponse returns the keygate error of resp, or nil. The body is read and put
// back, so the caller can still read it.
func ErrorFromResponse(resp *http.Response) *Error {
	if resp.StatusCode < 400 || resp.Body == nil {
		return nil
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return nil
	}
	return ParseError(resp.StatusCode, resp.Header, body)
}
