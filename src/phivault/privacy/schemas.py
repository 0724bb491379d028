"""Request and response models of the privacy routes (SPEC §9)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from phivault.privacy.export import ExportFormat


class ExportQuery(BaseModel):
    """The query of `GET /me/export`: an unknown parameter is a 422, like an unknown format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: ExportFormat = Field(
        ExportFormat.JSON, description="`json` (the default): one JSON document of every "
                                       "section; `fhir`: a FHIR R4 Bundle of type `collection`.")
