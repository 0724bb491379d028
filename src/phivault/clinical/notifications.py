"""Notifications to users (a doctor's proposal, a break-glass access): listed, and marked read
by their owner only. The text is PHI (who proposed what to whom), so it is sealed, and it never
reaches a log line or an audit event."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from phivault.access.care import deny
from phivault.audit import service as audit
from phivault.audit.actions import Action
from phivault.clinical.models import Notification
from phivault.clinical.schemas import NotificationView
from phivault.crypto.envelope import Envelope
from phivault.db.base import utcnow
from phivault.db.paging import fetch_page
from phivault.errors import NotFound
from phivault.keys.service import new_row_cipher, row_cipher

TABLE = "notifications"


def notify(session: AsyncSession, envelope: Envelope, user_id: uuid.UUID, kind: str,
           text: str) -> None:
    row_id = uuid.uuid4()
    cipher = new_row_cipher(session, envelope, TABLE, row_id)
    session.add(Notification(id=row_id, user_id=user_id, data_key_id=cipher.data_key_id,
                             kind=kind, text=cipher.seal("text", text), created_at=utcnow(),
                             read_at=None))


async def _view(session: AsyncSession, envelope: Envelope,
                row: Notification) -> NotificationView:
    cipher = await row_cipher(session, envelope, TABLE, row.id, row.data_key_id)
    return NotificationView(id=row.id, kind=row.kind, text=cipher.open("text", row.text),
                            created_at=row.created_at, read_at=row.read_at)


async def mark_read(session: AsyncSession, envelope: Envelope, user_id: uuid.UUID,
                    is_patient: bool, notification_id: uuid.UUID) -> NotificationView:
    """Mark one of the caller's notifications read (once: marking it again keeps the first
    time). Another user's, or none, is `NotFound`, and an `ACCESS_DENIED` event."""
    row = (await session.execute(select(Notification).where(
        Notification.id == notification_id, Notification.user_id == user_id)
        .with_for_update())).scalar_one_or_none()
    if row is None:
        raise deny(session, NotFound(), None, "notification", "no_such_notification")
    already = row.read_at is not None
    if not already:
        row.read_at = utcnow()
    audit.record(session, Action.UPDATE_NOTIFICATION, resource_type="notification",
                 resource_id=row.id, patient_id=user_id if is_patient else None,
                 metadata={"already_read": already})
    return await _view(session, envelope, row)


async def list_mine(session: AsyncSession, envelope: Envelope, user_id: uuid.UUID,
                    is_patient: bool, limit: int,
                    offset: int) -> tuple[list[NotificationView], int]:
    rows, total = await fetch_page(session, select(Notification).where(
        Notification.user_id == user_id).order_by(Notification.created_at.desc(),
                                                  Notification.id), limit, offset)
    views = [await _view(session, envelope, row) for row in rows]
    audit.record(session, Action.VIEW_NOTIFICATION, resource_type="notification",
                 patient_id=user_id if is_patient else None, metadata={"count": len(views)})
    return views, total
