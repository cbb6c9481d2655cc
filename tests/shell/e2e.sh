#!/usr/bin/env bash
# End-to-end check with real third-party clients (curl, openssl s_client) against the
# fhirgate binary running the shipped config.yaml on the built-in development stack.
# Run by tests/it/shell.rs, which passes FHIRGATE and free GW_PORT, UP_PORT, ADMIN_PORT, AUTH_PORT.
set -u
: "${FHIRGATE:?path to the fhirgate binary}" "${GW_PORT:?}" "${UP_PORT:?}" "${ADMIN_PORT:?}" "${AUTH_PORT:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
T=$(mktemp -d)
GW_PID=
cleanup() { [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT

pass=0 fail=0
ok()  { pass=$((pass+1)); echo "ok   - $1"; }
bad() { fail=$((fail+1)); echo "FAIL - $1"; }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }

sed -e "s/127.0.0.1:8443/127.0.0.1:$GW_PORT/" -e "s#http://127.0.0.1:8081#http://127.0.0.1:$UP_PORT#" \
    -e "s/127.0.0.1:9901/127.0.0.1:$ADMIN_PORT/" -e "s#https://localhost:9443#https://localhost:$AUTH_PORT#" \
    "$ROOT/config.yaml" > "$T/config.yaml"
"$FHIRGATE" demo --config "$T/config.yaml" > "$T/gw.log" 2>&1 &
GW_PID=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$GW_PORT") 2>/dev/null && break
  sleep 0.1
done
D=$T/certs/dev
URL=https://localhost:$GW_PORT
C=(curl -sS --max-time 10 --cacert "$D/root-ca.crt")

# A token by client credentials (HTTP Basic) from the demo's development authorisation server.
token_json=$("${C[@]}" -u "bars-sender:$(cat "$D/auth-sender.secret")" -d grant_type=client_credentials "https://localhost:$AUTH_PORT/token")
TOKEN=$(sed -E 's/.*"access_token":"([^"]+)".*/\1/' <<<"$token_json")
check "curl gets a token by client credentials" grep -q '"token_type":"Bearer"' <<<"$token_json"
AUTH=(-H "Authorization: Bearer $TOKEN")

# curl with a valid client certificate: forwarded, identity visible upstream.
body=$("${C[@]}" --cert "$D/client.crt" --key "$D/client.key" "$URL/metadata")
check "curl --cert valid client gets the CapabilityStatement" grep -q '"resourceType":"CapabilityStatement"' <<<"$body"
NH=()
while IFS= read -r line; do NH+=(-H "$line"); done < <("$FHIRGATE" nhsd example)
check "nhsd example prints six headers" test "${#NH[@]}" = 12
code=$("${C[@]}" -o "$T/out" -w '%{http_code}' --cert "$D/client.crt" --key "$D/client.key" "${NH[@]}" "$URL/Patient/1")
check "no token gets 401" test "$code" = 401
check "401 carries a Bearer challenge" bash -c '"$@" -D - -o /dev/null | grep -qi "^www-authenticate: Bearer"' _ "${C[@]}" --cert "$D/client.crt" --key "$D/client.key" "${NH[@]}" "$URL/Patient/1"
code=$("${C[@]}" -o "$T/out" -w '%{http_code}' --cert "$D/client.crt" --key "$D/client.key" -H 'Authorization: Bearer forged' "${NH[@]}" "$URL/Patient/1")
check "unknown token gets 403" test "$code" = 403
code=$("${C[@]}" -o "$T/out" -w '%{http_code}' --cert "$D/client.crt" --key "$D/client.key" "${AUTH[@]}" "$URL/Patient/1")
check "missing NHSD headers get 400" test "$code" = 400
check "400 names the missing header" grep -q 'X-Request-ID' "$T/out"
body=$("${C[@]}" --cert "$D/client.crt" --key "$D/client.key" "${AUTH[@]}" "${NH[@]}" -H 'X-Client-Cert-Subject: CN=spoof' -H 'X-Fhirgate-Ods-Code: SPOOF' "$URL/Patient/1")
check "upstream sees the verified ODS code" grep -q 'x-fhirgate-ods-code.*A1001' <<<"$body"
check "upstream sees the verified subject" grep -q 'x-client-cert-subject.*CN=BaRS-X26' <<<"$body"
check "spoofed headers never reach the upstream" bash -c '! grep -qi spoof <<<"$1"' _ "$body"
check "upstream sees the introspected client id" grep -q 'x-fhirgate-client-id.*bars-sender' <<<"$body"
code=$("${C[@]}" --http2 -o /dev/null -w '%{http_version}' --cert "$D/client.crt" --key "$D/client.key" "$URL/metadata")
check "curl negotiates HTTP/2" test "$code" = 2
code=$("${C[@]}" -o "$T/out" -w '%{http_code}' --path-as-is --cert "$D/client.crt" --key "$D/client.key" "${AUTH[@]}" "${NH[@]}" "$URL/metadata/../Patient/1")
check "dot-segment path gets 400" test "$code" = 400
check "400 body is an OperationOutcome" grep -q '"resourceType":"OperationOutcome"' "$T/out"

# Refused certificates: curl fails, nothing is served.
for who in revoked-client expired-client foreign-client; do
  check "curl with $who is refused" bash -c '! "$@" >/dev/null 2>&1' _ "${C[@]}" --cert "$D/$who.crt" --key "$D/$who.key" "$URL/metadata"
done
check "curl without a client certificate is refused" bash -c '! "$@" >/dev/null 2>&1' _ "${C[@]}" "$URL/metadata"

# openssl s_client: handshake details.
S=(openssl s_client -connect "127.0.0.1:$GW_PORT" -servername localhost -CAfile "$D/root-ca.crt" -verify_return_error)
out=$(timeout 10 "${S[@]}" -cert "$D/client.crt" -key "$D/client.key" -alpn h2,http/1.1 </dev/null 2>&1)
check "s_client: valid client verifies the server chain" grep -q 'Verify return code: 0 (ok)' <<<"$out"
check "s_client: ALPN selects h2" grep -q 'ALPN protocol: h2' <<<"$out"
out=$(timeout 10 "${S[@]}" -tls1_2 -cert "$D/revoked-client.crt" -key "$D/revoked-client.key" </dev/null 2>&1)
check "s_client: revoked client gets a 'certificate revoked' alert" grep -qi 'certificate revoked' <<<"$out"
out=$(timeout 10 "${S[@]}" -tls1_2 -cert "$D/foreign-client.crt" -key "$D/foreign-client.key" </dev/null 2>&1)
check "s_client: foreign client gets an 'unknown ca' alert" grep -qi 'unknown ca' <<<"$out"
out=$(timeout 10 "${S[@]}" -tls1_1 -cert "$D/client.crt" -key "$D/client.key" </dev/null 2>&1)
check "s_client: TLS 1.1 is refused" bash -c '! grep -q "Cipher is" <<<"$1" || grep -q "Cipher is (NONE)" <<<"$1"' _ "$out"
out=$(timeout 10 "${S[@]}" -tls1_2 -cert "$D/client.crt" -key "$D/client.key" -brief </dev/null 2>&1)
check "s_client: TLS 1.2 with a valid client works" grep -q 'Protocol version: TLSv1.2' <<<"$out"

# Admin listener: probes and Prometheus metrics with the refusals counted.
check "readyz is 200" test "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz")" = 200
check "readyz says the introspection endpoint is known" grep -q 'token_verification: ok (introspection endpoint known' <<<"$(curl -s "http://127.0.0.1:$ADMIN_PORT/readyz")"
check "access lines log a token hash, never the token" bash -c 'grep -q "token_hash=" "$1" && ! grep -qF "$2" "$1"' _ "$T/gw.log" "$TOKEN"
metrics=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics")
check "metrics count revoked handshakes" grep -q 'fhirgate_tls_handshakes_total{result="revoked"}' <<<"$metrics"
check "metrics count requests by route" grep -q 'fhirgate_requests_total{route="capabilities",status="200"}' <<<"$metrics"
check "metrics count introspections" grep -q 'fhirgate_introspections_total{result="ok"}' <<<"$metrics"

# Handshake refusals are logged with their reason, and the process stops cleanly.
check "gateway log names the revocation" grep -q 'kind="revoked"' "$T/gw.log"
kill -TERM "$GW_PID"; wait "$GW_PID"; rc=$?; GW_PID=
check "SIGTERM stops the gateway with exit 0" test "$rc" = 0

echo "shell: $pass passed, $fail failed"
[ "$fail" = 0 ]
