# fhirgate's and nginx's configurations for the token and proxy jobs, shared by bench/run
# and bench/profile so both measure the same job. Sourced; the caller sets W (work
# directory, holding gw.secret), UP (upstream port), AS (introspection stub port) and
# ADMIN (fhirgate's admin port). Each function writes its file and prints its path.
fg_config() { # pki-dir port token-mode(required|none)
  cat > "$W/fhirgate-$2.yaml" <<EOF
environment: development
listeners: [{address: 127.0.0.1:$2}]
tls:
  server_cert: $1/server.crt
  server_key: $1/server.key
  trust_bundles:
    - {name: nhs-int, ca_files: [$1/root-ca.crt, $1/sub-ca.crt], crl_files: [$1/sub-ca.crl, $1/root-ca.crl]}
limits: {max_connections: 20000, idle_timeout: 120s}
upstream: {url: "http://127.0.0.1:$UP", pool_max_idle_per_host: 128}
admin: {address: "127.0.0.1:$ADMIN"}
auth:
  mode: introspection
  introspection_endpoint: http://127.0.0.1:$AS/introspect
  client_auth: {method: client_secret_basic, client_id: fhirgate-bench, client_secret_file: $W/gw.secret}
routes: [{name: fhir, path_prefix: /, token: $3}]
EOF
  echo "$W/fhirgate-$2.yaml"
}

nginx_config() { # pki-dir port job(token|proxy)
  local d=$W/nginx-$3 auth=""
  [ "$3" = token ] && auth="auth_request /_introspect;"
  mkdir -p "$d/cache"
  cat "$1/root-ca.crt" "$1/sub-ca.crt" > "$d/ca.pem"
  cat "$1/sub-ca.crl" "$1/root-ca.crl" > "$d/crl.pem"
  cat > "$d/nginx.conf" <<EOF
user root;
worker_processes 1;
pid $W/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 10000; }
http {
  access_log $d/access.log;
  proxy_cache_path $d/cache keys_zone=tokens:10m;
  # What fhirgate forwards besides the subject (bench/README.md, "The jobs"): the CN out
  # of the subject, and an X-Request-ID made up when the client sent none.
  map \$ssl_client_s_dn \$client_cn { ~CN=(?<cn>[^,]+) \$cn; default ""; }
  map \$http_x_request_id \$req_id { "" \$request_id; default \$http_x_request_id; }
  upstream fhir { server 127.0.0.1:$UP; keepalive 128; }
  upstream authz { server 127.0.0.1:$AS; keepalive 16; }
  server {
    listen 127.0.0.1:$2 ssl http2;
    ssl_certificate $1/server.crt;
    ssl_certificate_key $1/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_client_certificate $d/ca.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_crl $d/crl.pem;
    ssl_session_cache shared:SSL:10m;
    keepalive_requests 10000000;
    http2_max_requests 10000000;
    keepalive_timeout 120s;
    client_max_body_size 10m;
    # Stream request bodies like fhirgate does, instead of spooling them to temp files.
    client_body_buffer_size 128k;
    proxy_request_buffering off;
    location / {
      $auth
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # fhirgate's identity and forwarding headers, as far as nginx has them (not its
      # traceparent nor the token's verified facts), and no bearer token upstream.
      proxy_set_header X-Client-Cert-Subject \$ssl_client_s_dn;
      proxy_set_header X-Client-Cert-Issuer \$ssl_client_i_dn;
      proxy_set_header X-Client-Cert-Fingerprint \$ssl_client_fingerprint;
      proxy_set_header X-Client-Cert-Serial \$ssl_client_serial;
      proxy_set_header X-Client-Cert-CN \$client_cn;
      proxy_set_header X-Client-Cert-Bundle nhs-int;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$http_host;
      proxy_set_header X-Request-ID \$req_id;
      proxy_set_header Authorization "";
      proxy_pass http://fhir;
    }
    location = /_introspect {
      internal;
      proxy_pass http://authz/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache tokens;
      proxy_cache_key \$http_authorization;
      proxy_cache_valid 200 60s;
      proxy_cache_lock on;
    }
  }
}
EOF
  echo "$d/nginx.conf"
}
