#!/bin/sh
# Set OpenBao up for the broker with the bao CLI: the same steps `broker dev` runs
# (broker/devserver.py) and an operator runs in production (README, "What the broker needs in
# Vault / OpenBao"). Used by the openbao-init service of compose.yaml; runs anywhere `bao` is:
#
#   BAO_ADDR=http://127.0.0.1:8200 BAO_TOKEN=root SECRETS_DIR=./secrets sh deploy/compose/openbao-init.sh
#
# Writes SECRETS_DIR/role_id and SECRETS_DIR/secret_id (mode 0600; owned by BROKER_UID if set).
# Safe to run again: it rewrites the same roles and issues a fresh secret_id.
set -eu

: "${BAO_ADDR:?set BAO_ADDR to the OpenBao address}"
: "${BAO_TOKEN:?set BAO_TOKEN to a token that may write policies, roles and auth methods}"
SECRETS_DIR="${SECRETS_DIR:-/secrets}"
PROFILE_ROLE="${PROFILE_ROLE:-demo}"     # token role (and policy) of the sample profile
APPROLE="${APPROLE:-broker}"             # the broker's own AppRole

# What a token of the profile may do (the sample: read secret/data/demo/*).
bao policy write "$PROFILE_ROLE" - <<POLICY
path "secret/data/$PROFILE_ROLE/*" { capabilities = ["read"] }
POLICY

# The token role the broker mints through: orphan, so minted tokens outlive the broker's login.
bao write "auth/token/roles/$PROFILE_ROLE" allowed_policies="$PROFILE_ROLE" orphan=true \
  renewable=false token_explicit_max_ttl=24h

# The broker's own policy: mint through its role, look tokens up, revoke by accessor, renew itself.
bao policy write "$APPROLE-policy" - <<POLICY
path "auth/token/create/$PROFILE_ROLE" { capabilities = ["create", "update"] }
path "auth/token/lookup"               { capabilities = ["update"] }
path "auth/token/lookup-accessor"      { capabilities = ["update"] }
path "auth/token/revoke-accessor"      { capabilities = ["update"] }
path "auth/token/lookup-self"          { capabilities = ["read"] }
path "auth/token/renew-self"           { capabilities = ["update"] }
POLICY

# Its AppRole login.
if ! bao auth list -format=json | grep -q '"approle/"'; then
  bao auth enable approle
fi
bao write "auth/approle/role/$APPROLE" token_policies="$APPROLE-policy" token_ttl=1h token_max_ttl=24h \
  secret_id_ttl=0

# role_id and secret_id into files only the broker can read (never to the log).
umask 077
mkdir -p "$SECRETS_DIR"
chmod 700 "$SECRETS_DIR"
bao read -field=role_id "auth/approle/role/$APPROLE/role-id" > "$SECRETS_DIR/role_id.tmp"
bao write -f -field=secret_id "auth/approle/role/$APPROLE/secret-id" > "$SECRETS_DIR/secret_id.tmp"
chmod 600 "$SECRETS_DIR/role_id.tmp" "$SECRETS_DIR/secret_id.tmp"
if [ -n "${BROKER_UID:-}" ]; then
  chown "$BROKER_UID:${BROKER_GID:-$BROKER_UID}" "$SECRETS_DIR" "$SECRETS_DIR/role_id.tmp" "$SECRETS_DIR/secret_id.tmp"
fi
mv -f "$SECRETS_DIR/role_id.tmp" "$SECRETS_DIR/role_id"
mv -f "$SECRETS_DIR/secret_id.tmp" "$SECRETS_DIR/secret_id"
echo "openbao-init: token role $PROFILE_ROLE, AppRole $APPROLE; credentials in $SECRETS_DIR (0600)"
