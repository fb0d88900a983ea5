#!/usr/bin/env bash
# A long CI job on a per-job profile (mode = "per-job"), as a plain shell script.
#
# The job gets a token family of its own: `broker get --refresh-file` starts it (token on
# stdout, one-time refresh token in a 0600 file), `broker refresh` trades the refresh token for
# the next token before the current one runs out, and `broker release` revokes the family when
# the job ends, whatever the outcome (the trap). Needs BROKER_URL, BROKER_CERT, BROKER_KEY,
# BROKER_CA (see docs/job-authors.md); BROKER_PROFILE picks the profile (default: release);
# VAULT_ADDR for the `bao`/`vault` commands the job's work runs with the token.
#
# Under GitHub Actions (GITHUB_ACTIONS=true) get and refresh print an ::add-mask:: line for
# the token on stderr, where the runner reads it, so `$(broker get ...)` stays masked as is.
set -euo pipefail

profile="${BROKER_PROFILE:-release}"
workdir="$(mktemp -d)"                 # 0700: only this job's user can read the refresh file
refresh_file="$workdir/$profile.refresh"

finish() {
  if [[ -f "$refresh_file" ]]; then
    broker release --refresh-file "$refresh_file" > /dev/null || echo "per-job: release failed (broker unreachable?); the family ends at family_max_age" >&2
  fi
  rm -rf "$workdir"
}
trap finish EXIT

use_token() {  # stands for the job's real work with VAULT_TOKEN (bao, vault, terraform, ...)
  if command -v bao > /dev/null; then
    bao token lookup -field=policies
  else
    echo "per-job: step $1 has a token (${#VAULT_TOKEN} characters)"
  fi
}

# Generation 1. An assignment on its own line, so a failed fetch stops the job (set -e).
VAULT_TOKEN="$(broker get "$profile" --refresh-file "$refresh_file")"
export VAULT_TOKEN
use_token build

# ... the token's TTL is getting short: generation 2. The old token stays valid for the
# profile's grace window, then the broker revokes it.
VAULT_TOKEN="$(broker refresh --refresh-file "$refresh_file")"
use_token deploy

echo "per-job: done; the trap releases the family"
