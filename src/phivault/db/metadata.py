"""Every table's model, imported in one place so Alembic and the drift test see all of them."""

from __future__ import annotations

from phivault.audit import models as audit_models
from phivault.auth import models as auth_models
from phivault.clinical import models as clinical_models
from phivault.db.base import Base
from phivault.keys import models as key_models
from phivault.portal import models as portal_models
from phivault.privacy import models as privacy_models

target_metadata = Base.metadata

__all__ = ["audit_models", "auth_models", "clinical_models", "key_models", "portal_models",
           "privacy_models", "target_metadata"]
