"""Response models of the access routes: the patient's care team (SPEC §7)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class CareTeamMember(BaseModel):
    """A doctor with whom the patient has a care relationship now (`GET /me/care-team`)."""

    id: uuid.UUID = Field(description="The doctor's id: `DELETE /me/care-team/{id}` ends it.")
    full_name: str
    specialty: str | None
    since: datetime = Field(description=(
        "When the unbroken stretch of consultations that grants access now began: the "
        "creation of the earliest of them (for a doctor's proposal the patient accepted, when "
        "it was proposed). Cancelled consultations are not counted."))
    until: datetime | None = Field(description=(
        "When the relationship ends unless a new consultation is booked: the scheduled time "
        "of the last completed consultation plus PHIVAULT_CARE_RELATIONSHIP_DAYS; null while "
        "a consultation is scheduled."))
    basis: Literal["scheduled", "completed"] = Field(description=(
        "`scheduled`: a consultation is scheduled; `completed`: only completed consultations "
        "within the window keep the relationship."))
