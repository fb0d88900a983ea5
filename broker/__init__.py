"""token-broker: an mTLS sidecar that serves proactively rotated Vault/OpenBao tokens to CI jobs."""
