#!/usr/bin/env bash
# Makes the example server's and client's certificates from keys on a PKCS#11 token.
#
# Keys (generated on the token when missing, reused otherwise; never written to a file):
#   example-ca (ec:p256), example-server-ec (ec:p256), example-server-rsa (rsa:2048),
#   example-client (ec:p256)
# Certificates (written to the output directory, and stored on the token next to each key):
#   ca.pem             self-signed by example-ca, CA, 10 years
#   server-ec.pem      localhost, 127.0.0.1, ::1; serverAuth; issued by example-ca
#   server-rsa.pem     the same for the RSA key
#   client.pem         CN=rustls-hsm example client; clientAuth; issued by example-ca
#
# Usage: certs/make-example-certs.sh [--module PATH] [--token SEL --pin SOURCE] [--out DIR]
#                                    [--days N]
# Without --token, a SoftHSM token of its own is made (or reused) under DIR/softhsm, with
# random PINs in 0600 files there. The rustls-hsm binary is built with cargo unless
# RUSTLS_HSM_BIN names one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/certs/out"
module="${RUSTLS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
token=""
pin=""
days=365

while [ $# -gt 0 ]; do
  case "$1" in
    --module) module="$2"; shift 2 ;;
    --token) token="$2"; shift 2 ;;
    --pin) pin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$token" ] && [ -z "$pin" ]; then
  echo "--token needs --pin SOURCE (env:NAME, file:PATH, cmd:COMMAND or prompt)" >&2
  exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export RUSTLS_HSM_MODULE="$module"

if [ -n "${RUSTLS_HSM_BIN:-}" ]; then
  hsm() { "$RUSTLS_HSM_BIN" "$@"; }
else
  cargo build -q --manifest-path "$root/Cargo.toml" --features cli --bin rustls-hsm
  hsm() { "$root/target/debug/rustls-hsm" "$@"; }
fi

# A SoftHSM token of our own, unless one was named.
if [ -z "$token" ]; then
  store="$out/softhsm"
  mkdir -p "$store/tokens"
  chmod 700 "$store"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$store/tokens" > "$store/softhsm2.conf"
  export SOFTHSM2_CONF="$store/softhsm2.conf"
  token="rustls-hsm-example"
  pin="file:$store/user.pin"
  if [ ! -f "$store/user.pin" ]; then
    (umask 077
     od -An -N8 -tu8 /dev/urandom | tr -dc 0-9 | head -c 12 > "$store/user.pin"
     od -An -N8 -tu8 /dev/urandom | tr -dc 0-9 | head -c 12 > "$store/so.pin")
    hsm token init --label "$token" --so-pin "file:$store/so.pin" --pin "$pin" >/dev/null
  fi
fi
login=(--token "$token" --pin "$pin")

for spec in example-ca:ec:p256 example-server-ec:ec:p256 example-server-rsa:rsa:2048 \
            example-client:ec:p256; do
  label="${spec%%:*}"
  if ! hsm key show "${login[@]}" "$label" >/dev/null 2>&1; then
    hsm key generate "${login[@]}" --label "$label" --type "${spec#*:}" >/dev/null
    echo "generated key $label on token $token"
  fi
done

issue=(cert issue "${login[@]}" --ca-key example-ca --ca-cert "$out/ca.pem" --days "$days"
       --store-on-token --replace)
localhost=(--subject CN=localhost --san DNS:localhost --san IP:127.0.0.1 --san IP:::1)
hsm cert self-signed "${login[@]}" --key example-ca --ca --days 3650 \
  --subject "CN=rustls-hsm example CA,O=rustls-hsm" --store-on-token --replace --out "$out/ca.pem"
hsm "${issue[@]}" --key example-server-ec "${localhost[@]}" --out "$out/server-ec.pem"
hsm "${issue[@]}" --key example-server-rsa "${localhost[@]}" --out "$out/server-rsa.pem"
hsm "${issue[@]}" --key example-client --client \
  --subject "CN=rustls-hsm example client,O=rustls-hsm" --out "$out/client.pem"

# An independent check of what was signed on the token.
openssl verify -CAfile "$out/ca.pem" "$out/server-ec.pem" "$out/server-rsa.pem" "$out/client.pem"

env_prefix=""
[ -n "${SOFTHSM2_CONF:-}" ] && env_prefix="SOFTHSM2_CONF=$SOFTHSM2_CONF "
cat <<USAGE

Serve them (mTLS with the same CA):
  ${env_prefix}cargo run --example tls_server -- --module $module \\
    --token $token --pin $pin \\
    --key example-server-ec --cert $out/server-ec.pem \\
    --key example-server-rsa --cert $out/server-rsa.pem --client-ca $out/ca.pem
Then, in another shell:
  ${env_prefix}cargo run --example tls_client -- --module $module \\
    --token $token --pin $pin \\
    --key example-client --cert $out/client.pem --ca-file $out/ca.pem
USAGE
