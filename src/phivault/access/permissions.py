"""The roles of SPEC §4 and §7, in one place."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    PATIENT = "patient"
    DOCTOR = "doctor"
    ADMIN = "admin"
    AUDITOR = "auditor"

    @property
    def is_staff(self) -> bool:
        return self is not Role.PATIENT
