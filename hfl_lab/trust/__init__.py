"""Trust service: attestation, mesh certificates, key broker, audit log; and its client."""
