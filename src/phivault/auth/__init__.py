"""Accounts and authentication: passwords, tokens, sessions, TOTP."""
