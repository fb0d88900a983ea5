#!/bin/sh
# The sample CI job of compose.yaml: fetch a token from the broker over mTLS with `broker get`,
# then use it at OpenBao. It never prints the token. Needs BROKER_URL, BROKER_CERT, BROKER_KEY,
# BROKER_CA and VAULT_ADDR.
set -eu

# An assignment on its own line: `export VAULT_TOKEN="$(...)"` would hide a failed fetch.
VAULT_TOKEN="$(broker get "${BROKER_PROFILE:-demo}" --min-ttl 1m)"
export VAULT_TOKEN

python3 - <<'PY'
import json, os, urllib.request

request = urllib.request.Request(os.environ["VAULT_ADDR"].rstrip("/") + "/v1/auth/token/lookup-self",
                                 headers={"X-Vault-Token": os.environ["VAULT_TOKEN"]})
with urllib.request.urlopen(request, timeout=10) as response:
    data = json.load(response)["data"]
print(f"job: got a token valid at OpenBao: policies={data['policies']} ttl={data['ttl']}s "
      f"orphan={data['orphan']} meta={data.get('meta')}")
PY
