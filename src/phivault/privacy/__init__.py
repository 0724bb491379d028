"""Data-subject rights: consents, export, erasure, de-identified research exports."""
