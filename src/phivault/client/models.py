"""What the client's methods return: the server's own response models, and a few of the client's.

The response models come from the server's public schemas (`phivault.*.schemas`), so the client
and the server cannot disagree about a field; those modules import nothing but pydantic, so the
client stays installable and importable without the server's database or web stack. A few
answers are modelled where no schema module holds them yet (consents, audit verification,
health): `tests/client/` checks that they keep the server's fields.

A list answer is a `Page`: its items, and the total the server counted (`X-Total-Count`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar, overload

from pydantic import BaseModel

from phivault.access.schemas import CareTeamMember
from phivault.audit.schemas import AccessLogEntry, AuditEventView
from phivault.auth.schemas import (
    CreatedStaff,
    DoctorView,
    Me,
    MfaSetupAnswer,
    RegisterAnswer,
    SessionView,
    SetupInvitation,
    TokenPair,
    UserView,
)
from phivault.clinical.schemas import (
    AttachmentView,
    BreakGlassAnswer,
    ConsultationView,
    NotificationView,
    PatientListItem,
    PaymentView,
    PrescriptionView,
    RecordView,
)

T = TypeVar("T")

ExportFormat = Literal["json", "fhir"]
Sex = Literal["female", "male", "other", "unknown"]
StaffRole = Literal["doctor", "admin", "auditor"]
ConsultationStatus = Literal["proposed", "scheduled", "completed", "cancelled"]


class ConsentView(BaseModel):
    """A version of the patient's consents (`GET/PUT /me/consents`)."""

    marketing: bool
    data_sharing: bool
    analytics: bool
    consent_date: datetime


class VerifyAnswer(BaseModel):
    """`GET /audit/verify`: whether the chain holds, how many events were checked, the first
    bad `seq`, queued events the sequencer rejected, and how many waited too long."""

    ok: bool
    events: int
    first_bad_seq: int | None
    queue_tampered: list[int]
    queue_stale: int


class Health(BaseModel):
    """`/healthz` answers `ok`, `/readyz` answers `ready`."""

    status: Literal["ok", "ready"]


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: `items`, and `total` matching items (`X-Total-Count`; for the audit
    search `total_exact` is False when the server stopped counting at its cap)."""

    items: list[T]
    total: int | None
    total_exact: bool = True

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        return self.items[index]


@dataclass(frozen=True, slots=True)
class DownloadedFile:
    """What `download_attachment` wrote: the attachment's type, its size in bytes, and the
    name the server gave it (None when it gives none)."""

    content_type: str
    size: int
    filename: str | None = None


__all__ = [
    "AccessLogEntry", "AttachmentView", "AuditEventView", "BreakGlassAnswer", "CareTeamMember",
    "ConsentView", "ConsultationStatus", "ConsultationView", "CreatedStaff", "DoctorView",
    "DownloadedFile", "ExportFormat", "Health", "Me", "MfaSetupAnswer", "NotificationView",
    "Page", "PatientListItem", "PaymentView", "PrescriptionView", "RecordView",
    "RegisterAnswer", "SessionView", "SetupInvitation", "Sex", "StaffRole", "TokenPair",
    "UserView", "VerifyAnswer",
]
