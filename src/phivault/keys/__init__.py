"""Data-encryption keys: their table, row ciphers for services, status and rewrap."""
