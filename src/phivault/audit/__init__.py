"""The tamper-evident audit trail: events, the HMAC chain, append and verify."""
