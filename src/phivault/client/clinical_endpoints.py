"""The routes about care: consultations and payments, the care team, the doctor's patients,
records, prescriptions, attachment listings, break-glass, notifications, and the audit trail.

Uploading and downloading an attachment stream their bodies, so each client writes those two
out (`sync.py`, `aio.py`); listing attachments is an ordinary route, here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from phivault.client.account_endpoints import Id
from phivault.client.models import (
    AccessLogEntry,
    AttachmentView,
    AuditEventView,
    BreakGlassAnswer,
    CareTeamMember,
    ConsultationStatus,
    ConsultationView,
    NotificationView,
    Page,
    PatientListItem,
    PaymentView,
    PrescriptionView,
    RecordView,
    VerifyAnswer,
)
from phivault.client.routes import API, Call, body, endpoint, instant, nothing, one, page, paging


class ClinicalEndpoints:
    """Mixed into both clients; each attribute is a `Route` (see `routes.py`)."""

    # Consultations and payments.

    @endpoint("POST", f"{API}/consultations")
    @staticmethod
    def book_consultation(doctor_id: Id, scheduled_at: datetime, reason: str
                          ) -> Call[ConsultationView]:
        """A patient books a doctor: `scheduled` at once (a care relationship begins)."""
        return Call(one(ConsultationView), json={
            "doctor_id": str(doctor_id), "scheduled_at": instant(scheduled_at),
            "reason": reason})

    @endpoint("POST", f"{API}/consultations")
    @staticmethod
    def propose_consultation(patient_id: Id, scheduled_at: datetime, reason: str
                             ) -> Call[ConsultationView]:
        """A doctor schedules a follow-up (`scheduled`) or, for a patient they do not care for
        yet, proposes one (`proposed`, until the patient accepts it)."""
        return Call(one(ConsultationView), json={
            "patient_id": str(patient_id), "scheduled_at": instant(scheduled_at),
            "reason": reason})

    @endpoint("GET", f"{API}/consultations")
    @staticmethod
    def list_consultations(*, limit: int | None = None, offset: int | None = None
                           ) -> Call[Page[ConsultationView]]:
        """The caller's own consultations (a patient's or a doctor's)."""
        return Call(page(ConsultationView), params=paging(limit, offset))

    @endpoint("PATCH", f"{API}/consultations/{{consultation_id}}")
    @staticmethod
    def update_consultation(consultation_id: Id, *, status: ConsultationStatus | None = None,
                            scheduled_at: datetime | None = None, notes: str | None = None
                            ) -> Call[ConsultationView]:
        """Accept (`scheduled`, the patient), complete (the doctor, once its time has passed),
        cancel, reschedule, or write notes (the doctor)."""
        return Call(one(ConsultationView), path_values={"consultation_id": consultation_id},
                    json=body(status=status, scheduled_at=instant(scheduled_at), notes=notes))

    @endpoint("POST", f"{API}/consultations/{{consultation_id}}/payments")
    @staticmethod
    def pay(consultation_id: Id, *, amount: int, currency: str, provider_reference: str
            ) -> Call[PaymentView]:
        """Record a payment: `amount` in minor units; the provider handles the money."""
        return Call(one(PaymentView), path_values={"consultation_id": consultation_id},
                    json={"amount": amount, "currency": currency,
                          "provider_reference": provider_reference})

    @endpoint("GET", f"{API}/me/payments")
    @staticmethod
    def my_payments(*, limit: int | None = None, offset: int | None = None
                    ) -> Call[Page[PaymentView]]:
        """The patient's payments."""
        return Call(page(PaymentView), params=paging(limit, offset))

    @endpoint("GET", f"{API}/me/notifications")
    @staticmethod
    def my_notifications(*, limit: int | None = None, offset: int | None = None
                         ) -> Call[Page[NotificationView]]:
        """The caller's notifications (a doctor's proposal, a break-glass access)."""
        return Call(page(NotificationView), params=paging(limit, offset))

    @endpoint("POST", f"{API}/notifications/{{notification_id}}/read")
    @staticmethod
    def mark_notification_read(notification_id: Id) -> Call[NotificationView]:
        """Mark one of the caller's notifications read (marking it again keeps the first
        time)."""
        return Call(one(NotificationView), path_values={"notification_id": notification_id})

    # Who may read a chart.

    @endpoint("GET", f"{API}/me/care-team")
    @staticmethod
    def my_care_team(*, limit: int | None = None, offset: int | None = None
                     ) -> Call[Page[CareTeamMember]]:
        """The doctors who can read the patient's chart now."""
        return Call(page(CareTeamMember), params=paging(limit, offset))

    @endpoint("DELETE", f"{API}/me/care-team/{{doctor_id}}")
    @staticmethod
    def end_care_relationship(doctor_id: Id) -> Call[None]:
        """End that doctor's access at once (their open consultations are cancelled)."""
        return Call(nothing, path_values={"doctor_id": doctor_id})

    @endpoint("GET", f"{API}/patients")
    @staticmethod
    def my_patients(*, limit: int | None = None, offset: int | None = None
                    ) -> Call[Page[PatientListItem]]:
        """A doctor's patients: those with whom a care relationship exists now."""
        return Call(page(PatientListItem), params=paging(limit, offset))

    @endpoint("POST", f"{API}/patients/{{patient_id}}/break-glass")
    @staticmethod
    def break_glass(patient_id: Id, reason: str) -> Call[BreakGlassAnswer]:
        """Emergency read access to a chart for 60 minutes (a reason of 20+ characters; audited,
        and the patient is notified)."""
        return Call(one(BreakGlassAnswer), path_values={"patient_id": patient_id},
                    json={"reason": reason})

    # Records and prescriptions.

    @endpoint("POST", f"{API}/patients/{{patient_id}}/records")
    @staticmethod
    def create_record(patient_id: Id, diagnosis: str, prescriptions: list[str], *,
                      notes: str | None = None) -> Call[RecordView]:
        """A doctor writes a record in the patient's chart (version 1)."""
        return Call(one(RecordView), path_values={"patient_id": patient_id},
                    json=body(diagnosis=diagnosis, prescriptions=prescriptions, notes=notes))

    @endpoint("GET", f"{API}/patients/{{patient_id}}/records")
    @staticmethod
    def list_records(patient_id: Id, *, limit: int | None = None, offset: int | None = None
                     ) -> Call[Page[RecordView]]:
        """The latest version of each of the patient's records."""
        return Call(page(RecordView), path_values={"patient_id": patient_id},
                    params=paging(limit, offset))

    @endpoint("GET", f"{API}/records/{{record_id}}")
    @staticmethod
    def read_record(record_id: Id) -> Call[RecordView]:
        """The latest version of a record."""
        return Call(one(RecordView), path_values={"record_id": record_id})

    @endpoint("PATCH", f"{API}/records/{{record_id}}")
    @staticmethod
    def amend_record(record_id: Id, *, diagnosis: str | None = None,
                     prescriptions: list[str] | None = None, notes: str | None = None
                     ) -> Call[RecordView]:
        """A new version; fields not given carry over."""
        return Call(one(RecordView), path_values={"record_id": record_id},
                    json=body(diagnosis=diagnosis, prescriptions=prescriptions, notes=notes))

    @endpoint("GET", f"{API}/records/{{record_id}}/versions")
    @staticmethod
    def record_versions(record_id: Id) -> Call[Page[RecordView]]:
        """Every version of a record, oldest first."""
        return Call(page(RecordView), path_values={"record_id": record_id})

    @endpoint("POST", f"{API}/patients/{{patient_id}}/prescriptions")
    @staticmethod
    def prescribe(patient_id: Id, *, medication: str, dosage: str, instructions: str
                  ) -> Call[PrescriptionView]:
        """A doctor prescribes for the patient."""
        return Call(one(PrescriptionView), path_values={"patient_id": patient_id},
                    json={"medication": medication, "dosage": dosage,
                          "instructions": instructions})

    @endpoint("GET", f"{API}/patients/{{patient_id}}/prescriptions")
    @staticmethod
    def list_prescriptions(patient_id: Id, *, limit: int | None = None,
                           offset: int | None = None) -> Call[Page[PrescriptionView]]:
        """The patient's prescriptions."""
        return Call(page(PrescriptionView), path_values={"patient_id": patient_id},
                    params=paging(limit, offset))

    @endpoint("GET", f"{API}/patients/{{patient_id}}/attachments")
    @staticmethod
    def list_attachments(patient_id: Id, *, limit: int | None = None,
                         offset: int | None = None) -> Call[Page[AttachmentView]]:
        """The patient's attachments' metadata (download one with `download_attachment`)."""
        return Call(page(AttachmentView), path_values={"patient_id": patient_id},
                    params=paging(limit, offset))

    # The audit trail.

    @endpoint("GET", f"{API}/me/access-log")
    @staticmethod
    def my_access_log(*, limit: int | None = None, offset: int | None = None
                      ) -> Call[Page[AccessLogEntry]]:
        """Who else accessed the patient's data, and how."""
        return Call(page(AccessLogEntry), params=paging(limit, offset))

    @endpoint("GET", f"{API}/audit")
    @staticmethod
    def search_audit(*, actor_id: Id | None = None, patient_id: Id | None = None,
                     action: str | None = None,
                     outcome: Literal["success", "denied", "error"] | None = None,
                     resource_type: str | None = None, resource_id: Id | None = None,
                     since: datetime | None = None, until: datetime | None = None,
                     order: Literal["desc", "asc"] | None = None, limit: int | None = None,
                     offset: int | None = None) -> Call[Page[AuditEventView]]:
        """Auditors: the events matching every filter given, newest first (`order="asc"`:
        oldest first); `since` inclusive, `until` exclusive (aware times)."""
        return Call(page(AuditEventView), params=paging(
            limit, offset, actor_id=_text(actor_id), patient_id=_text(patient_id),
            action=action, outcome=outcome, resource_type=resource_type,
            resource_id=_text(resource_id), since=instant(since), until=instant(until),
            order=order))

    @endpoint("GET", f"{API}/audit/verify")
    @staticmethod
    def verify_audit() -> Call[VerifyAnswer]:
        """Auditors: recompute the audit chain (`ok`, `events`, `first_bad_seq`)."""
        return Call(one(VerifyAnswer))


def _text(value: Id | None) -> str | None:
    return None if value is None else str(value)


__all__ = ["ClinicalEndpoints"]
