"""The portal's router with every page on it: the sign-in pages (`portal/web.py`), the
patient's (`portal/patient.py`) and the auditor's (`portal/auditor.py`)."""

from __future__ import annotations

from phivault.portal import auditor, patient
from phivault.portal.web import router

__all__ = ["auditor", "patient", "router"]
