"""Notifications to users (a doctor's proposal, a break-glass access); the text is sealed."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.clinical.models import Notification
from phivault.clinical.schemas import NotificationView
from phivault.crypto.envelope import Envelope
from phivault.db.base import utcnow
from phivault.db.paging import fetch_page
from phivault.keys.service import new_row_cipher, row_cipher

TABLE = "notifications"


def notify(session: AsyncSession, envelope: Envelope, user_id: uuid.UUID, kind: str,
           text: str) -> None:
    row_id = uuid.uuid4()
    cipher = new_row_cipher(session, envelope, TABLE, row_id)
    session.add(Notification(id=row_id, user_id=user_id, data_key_id=cipher.data_key_id,
                             kind=kind, text=cipher.seal("text", text), created_at=utcnow(),
                             read_at=None))


async def list_mine(session: AsyncSession, envelope: Envelope, user_id: uuid.UUID,
                    is_patient: bool, limit: int,
                    offset: int) -> tuple[list[NotificationView], int]:
    rows, total = await fetch_page(session, select(Notification).where(
        Notification.user_id == user_id).order_by(Notification.created_at.desc(),
                                                  Notification.id), limit, offset)
    views = []
    for row in rows:
        cipher = await row_cipher(session, envelope, TABLE, row.id, row.data_key_id)
        views.append(NotificationView(id=row.id, kind=row.kind, text=cipher.open("text",
                                                                                 row.text),
                                      created_at=row.created_at, read_at=row.read_at))
    audit.record(session, Action.VIEW_NOTIFICATION, resource_type="notification",
                 patient_id=user_id if is_patient else None, metadata={"count": len(views)})
    return views, total
