"""Request and response models of the audit routes: the search filters of `GET /audit`, its
events, and the entries of a patient's access log."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from phivault.audit.actions import Action, Outcome
from phivault.schemas import Instant, UUIDText

# `Instant` (ISO 8601 with an offset, never a timestamp) is shared: phivault.schemas.
ResourceType = Annotated[str, StringConstraints(min_length=1, max_length=48,
                                                pattern=r"^[a-z][a-z_]*$")]
PAGING_PARAMETERS = frozenset({"limit", "offset"})


class SortOrder(StrEnum):
    DESC = "desc"
    ASC = "asc"


class AuditSearch(BaseModel):
    """The filters of `GET /audit`, all optional and combined with AND. An unknown query
    parameter is a 422, so a misspelt filter never silently widens a search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actor_id: UUIDText | None = Field(None, description="Who acted (a user id).")
    patient_id: UUIDText | None = Field(None, description="Whose data the event is about.")
    action: Action | None = Field(None, description="One action of the audit vocabulary.")
    outcome: Outcome | None = None
    resource_type: ResourceType | None = Field(None, description="e.g. `medical_record`.")
    resource_id: UUIDText | None = Field(None, description="The id of the resource (with "
                                                           "`resource_type`).")
    since: Instant | None = Field(None, description="Events at or after this time "
                                                    "(ISO 8601 with an offset).")
    until: Instant | None = Field(None, description="Events strictly before this time.")
    order: SortOrder = Field(SortOrder.DESC, description="By `seq`: `desc` (newest first, "
                                                         "the default) or `asc`.")

    @model_validator(mode="before")
    @classmethod
    def _leave_paging_to_page(cls, data: Any) -> Any:
        # FastAPI hands a query model every query parameter; `limit` and `offset` are PageDep's.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in PAGING_PARAMETERS}
        return data

    @model_validator(mode="after")
    def _coherent(self) -> AuditSearch:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until")
        # Resources are indexed by (type, id): an id alone would read the whole trail.
        if self.resource_id is not None and self.resource_type is None:
            raise ValueError("resource_id needs resource_type")
        return self


class AuditEventView(BaseModel):
    """One event of the trail. `metadata` holds only allowlisted keys (ids, counts, codes,
    flags), never PHI. `break_glass_reason` is set on `BREAK_GLASS` events only: the reason the
    doctor gave, opened for the auditor (reading it is itself audited,
    `VIEW_BREAK_GLASS_REASON`); null for other events, and for a grant whose reason was never
    stored."""

    seq: int
    event_id: uuid.UUID | None
    at: datetime
    actor_id: uuid.UUID | None
    actor_role: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    patient_id: uuid.UUID | None
    outcome: str
    ip: str | None
    user_agent: str | None
    request_id: str | None
    metadata: dict[str, Any]
    hash: str = Field(description="The event's chain hash, hex.")
    break_glass_reason: str | None = None


class AccessLogEntry(BaseModel):
    """One access to the patient's data by someone else. `actor_name` is a staff member's name,
    null for the system and for anyone who is not staff. `break_glass` marks emergency access:
    the break-glass itself and every read made under it."""

    at: datetime
    actor_role: str | None
    actor_name: str | None
    action: str
    outcome: str
    break_glass: bool


__all__ = ["AccessLogEntry", "AuditEventView", "AuditSearch", "Instant", "SortOrder"]
