// Command send sends one signed request to keygate and prints the status code on its last
// line.
//
//	KEYGATE_URL=http://127.0.0.1:8080 KEYGATE_PUBLIC_KEY=pk_test_… KEYGATE_SECRET=sk_test_… \
//	    go run ./examples/send
//
// Optional: KEYGATE_METHOD (POST), KEYGATE_TARGET (/v1/payments), KEYGATE_BODY
// ({"amount":"1.00"}; empty for none), KEYGATE_SCHEME (hmac-v1, hmac-body or bearer).
// Exits 0 on a 2xx answer, 1 otherwise.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	keygate "github.com/keygate/keygate/clients/go"
)

func get(name, fallback string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return fallback
}

func main() {
	creds := keygate.Credentials{
		PublicKey: os.Getenv("KEYGATE_PUBLIC_KEY"),
		Secret:    os.Getenv("KEYGATE_SECRET"),
		Scheme:    keygate.Scheme(get("KEYGATE_SCHEME", "hmac-v1")),
	}
	method := strings.ToUpper(get("KEYGATE_METHOD", "POST"))
	body := get("KEYGATE_BODY", `{"amount":"1.00"}`)
	url := strings.TrimSuffix(os.Getenv("KEYGATE_URL"), "/") + get("KEYGATE_TARGET", "/v1/payments")
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	client := &http.Client{Transport: &keygate.Transport{Credentials: creds}, Timeout: 10 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	if kerr := keygate.ErrorFromResponse(resp); kerr != nil {
		fmt.Printf("keygate refused it: %s (%s), request id %s\n", kerr.Code, kerr.Detail, kerr.RequestID)
	}
	answer, _ := io.ReadAll(resp.Body)
	fmt.Println(string(answer))
	fmt.Println(resp.StatusCode)
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		os.Exit(1)
	}
}
