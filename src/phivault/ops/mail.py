"""What phivault mails, and how it leaves only after the work it reports has committed.

Two kinds of mail, each carrying no more than its reader needs: a new staff member's
invitation (their one-time setup token, when it expires, where to redeem it: no one else's
data), and a patient's break-glass notice (that their chart was opened in an emergency, when,
and where to look: their access log; never the doctor's reason or anything clinical).

A service `post`s mail to the request's `Outbox`; the outbox hands it to the web response as a
background task, which runs after the response is sent, and only when the unit of work has
committed (`SessionDep` commits as the route returns; a failed commit answers an error and runs
no task). So rolled-back work never mails, and a slow or broken mail server never delays,
fails or rolls back a request. A failed delivery is logged as a warning (its kind and the
error's class, never the address or the text) and audited as `MAIL_FAILURE`.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from smtplib import (
    SMTPAuthenticationError,
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
)
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from phivault.audit import service as audit
from phivault.audit.actions import Action, Outcome
from phivault.observability import get_logger
from phivault.ops.smtp import TIMEOUT_SECONDS, SmtpTarget, send_message
from phivault.request_context import SYSTEM

if TYPE_CHECKING:
    from phivault.config import Settings
    from phivault.runtime import Runtime

log = get_logger("phivault.mail")

MailKind = Literal["invitation", "break_glass"]
UnitOfWork = Callable[[], AbstractAsyncContextManager[AsyncSession]]


@dataclass(frozen=True, slots=True)
class Mail:
    """One message to one account. The address and the text never show in a `repr` (the text
    of an invitation holds a setup token)."""

    kind: MailKind
    user_id: uuid.UUID  # the recipient's account: what a failure's audit event names
    to: str = field(repr=False)
    subject: str
    body: str = field(repr=False)


def invitation(user_id: uuid.UUID, to: str, role: str, token: str,
               expires_at: datetime) -> Mail:
    """A new staff member's one-time setup token: the only way to their first password."""
    return Mail("invitation", user_id, to, "Your phivault account", (
        f"A phivault account with the role {role} was opened for you and approved.\n\n"
        "To choose your password, give this one-time setup token, with the password you "
        "choose, to your clinic's application (it sends both to POST /api/v1/auth/setup):\n\n"
        f"    {token}\n\n"
        f"It works once, until {expires_at:%Y-%m-%d %H:%M} UTC. Do not forward this message: "
        "whoever holds the token can take the account.\n\n"
        "If you did not expect it, do not use the token, and tell your administrator.\n"))


def break_glass_notice(patient_id: uuid.UUID, to: str, at: datetime) -> Mail:
    """That the patient's chart was opened in an emergency, and when; never why or by whom
    (the reason is clinical; the access log names who, behind the patient's login)."""
    return Mail("break_glass", patient_id, to, "Emergency access to your medical records", (
        "A doctor used emergency (break-glass) access to read your medical records at "
        f"{at:%Y-%m-%d %H:%M} UTC, for 60 minutes.\n\n"
        "You can see who and when in your access log, in your clinic's application (it reads "
        "GET /api/v1/me/access-log). Auditors review the reason given for every emergency "
        "access.\n"))


class Mailer:
    """Sends mail through one SMTP server, in a worker thread (`smtplib` blocks)."""

    def __init__(self, target: SmtpTarget, sender: str, *,
                 ssl_context: ssl.SSLContext | None = None,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.target = target
        self.sender = sender
        self.ssl_context = ssl_context
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Mailer | None:
        """The configured mailer, or None when `PHIVAULT_SMTP_URL` is unset (no mail)."""
        target = settings.smtp_target
        return None if target is None else cls(target, settings.mail_sender)

    def compose(self, mail: Mail) -> EmailMessage:
        message = EmailMessage(policy=policy.SMTP)
        message["From"] = self.sender
        message["To"] = mail.to
        message["Subject"] = mail.subject
        message["Date"] = formatdate(usegmt=True)
        domain = parseaddr(self.sender)[1].rpartition("@")[2] or "localhost"
        message["Message-ID"] = make_msgid("phivault", domain=domain)
        # RFC 3834: no vacation or out-of-office replies to a machine.
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(mail.body)
        return message

    async def send(self, mail: Mail) -> None:
        """Deliver `mail`, or raise what the server or the network answered."""
        message = self.compose(mail)
        await asyncio.to_thread(send_message, self.target, message,
                                ssl_context=self.ssl_context, timeout=self.timeout)


def failure_code(exc: BaseException) -> str:
    """A fixed code for why a delivery failed: what the log and the audit event say, since an
    SMTP error's own text may quote the recipient's address."""
    if isinstance(exc, SMTPAuthenticationError):
        return "auth_failed"
    if isinstance(exc, SMTPRecipientsRefused | SMTPSenderRefused):
        return "refused"
    if isinstance(exc, ssl.SSLError | SMTPNotSupportedError):
        return "tls_failed"
    if isinstance(exc, SMTPResponseException):
        return f"smtp_{exc.smtp_code}" if 200 <= exc.smtp_code <= 599 else "smtp_error"
    if isinstance(exc, OSError):
        return "unreachable"
    return "error"


async def deliver(mailer: Mailer, mail: Mail, unit_of_work: UnitOfWork) -> bool:
    """Send `mail`; on failure, log a warning and audit `MAIL_FAILURE` (neither holds the
    address or the text). Never raises: the request it belongs to is long answered."""
    try:
        await mailer.send(mail)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the request stands
        code = failure_code(exc)
        log.warning("mail_not_sent", kind=mail.kind, failure=code, error=type(exc).__name__)
        try:
            async with unit_of_work() as session:
                audit.record(session, Action.MAIL_FAILURE, actor=SYSTEM, outcome=Outcome.ERROR,
                             resource_type="user", resource_id=mail.user_id,
                             metadata={"kind": mail.kind, "reason": code})
        except Exception as audit_exc:  # noqa: BLE001
            log.error("mail_failure_not_audited", kind=mail.kind,
                      error=type(audit_exc).__name__)
        return False
    log.info("mail_sent", kind=mail.kind)
    return True


class TaskQueue(Protocol):
    """Where a request leaves work for after its response: the web layer's `BackgroundTasks`
    (named structurally, so that services never import the framework)."""

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Outbox:
    """The mail of one request, delivered after its response (so after its commit)."""

    mailer: Mailer
    tasks: TaskQueue
    unit_of_work: UnitOfWork

    def post(self, mail: Mail) -> None:
        self.tasks.add_task(deliver, self.mailer, mail, self.unit_of_work)


def outbox_for(runtime: Runtime, tasks: TaskQueue) -> Outbox | None:
    """The request's outbox, or None when no mail is configured."""
    mailer = Mailer.from_settings(runtime.settings)
    return None if mailer is None else Outbox(mailer, tasks, runtime.unit_of_work)
