#!/bin/sh
# A development PKI for compose.yaml, made with `broker certs` (run by the certs-init service,
# in the broker image). Works anywhere `broker` is:
#
#   PKI_DIR=./pki BROKER_CERTS_DIR=./broker-certs JOB_CERTS_DIR=./job-certs OPS_CERTS_DIR=./ops-certs \
#     sh deploy/compose/certs-init.sh
#
# PKI_DIR keeps the CA key and every cert; each consumer gets only what it needs:
#   BROKER_CERTS_DIR  ca.pem server.pem server.key   (the broker)
#   JOB_CERTS_DIR     ca.pem job.pem job.key         (CI jobs: cn:job, uri:spiffe://ci.example/runner/1)
#   OPS_CERTS_DIR     ca.pem ops.pem ops.key         (operators: cn:ops, admin)
# Existing files are kept, so the CA survives `docker compose down` (without -v).
set -eu

PKI_DIR="${PKI_DIR:-/pki}"
BROKER_CERTS_DIR="${BROKER_CERTS_DIR:-/broker-certs}"
JOB_CERTS_DIR="${JOB_CERTS_DIR:-/job-certs}"
OPS_CERTS_DIR="${OPS_CERTS_DIR:-/ops-certs}"
# The broker's names on the compose network and for published ports on the host.
SERVER_HOSTS="${SERVER_HOSTS:-broker localhost 127.0.0.1}"

umask 077
mkdir -p "$PKI_DIR"
if [ ! -f "$PKI_DIR/ca.pem" ]; then
  set --
  for host in $SERVER_HOSTS; do set -- "$@" --host "$host"; done
  broker certs init --dir "$PKI_DIR" "$@" > /dev/null
fi
[ -f "$PKI_DIR/job.pem" ] || broker certs client job --dir "$PKI_DIR" --uri spiffe://ci.example/runner/1 > /dev/null
[ -f "$PKI_DIR/ops.pem" ] || broker certs client ops --dir "$PKI_DIR" --days 30 > /dev/null

hand_out() {  # hand_out DIR NAME...: copy ca.pem and NAME.pem/NAME.key into DIR (keys stay 0600)
  dir="$1"; shift
  mkdir -p "$dir"
  chmod 700 "$dir"
  cp "$PKI_DIR/ca.pem" "$dir/ca.pem"
  for name in "$@"; do
    cp "$PKI_DIR/$name.pem" "$dir/$name.pem"
    cp "$PKI_DIR/$name.key" "$dir/$name.key"
    chmod 600 "$dir/$name.key"
  done
  chmod 644 "$dir"/*.pem
  if [ -n "${BROKER_UID:-}" ]; then
    chown -R "$BROKER_UID:${BROKER_GID:-$BROKER_UID}" "$dir"
  fi
}
hand_out "$BROKER_CERTS_DIR" server
hand_out "$JOB_CERTS_DIR" job
hand_out "$OPS_CERTS_DIR" ops
echo "certs-init: CA in $PKI_DIR; server cert for: $SERVER_HOSTS"
