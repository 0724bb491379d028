"""Outgoing mail (ops/): the forms of PHIVAULT_SMTP_URL and the settings around it, and delivery
to a real SMTP server (aiosmtpd) in plain, STARTTLS and implicit-TLS forms, with and without a
login; every way a delivery fails becomes a fixed code, a warning without the address, and a
MAIL_FAILURE audit event."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from phivault.audit.models import AuditEvent
from phivault.config import ConfigError, load_settings
from phivault.ops.mail import Mail, Mailer, break_glass_notice, deliver, invitation
from phivault.ops.smtp import SmtpTarget
from phivault.runtime import Runtime
from tests.helpers import free_port
from tests.smtp_server import smtp_server, trusting

TO = "dr.new@clinic.example"
TOKEN = "Zt0k3n-" + "x" * 40
SENDER = "phivault@clinic.example"


def a_mail(to: str = TO) -> Mail:
    return invitation(uuid.uuid4(), to, "doctor", TOKEN, datetime(2031, 5, 4, 10, 0, tzinfo=UTC))


# The URL's forms.

@pytest.mark.parametrize("url, expected", [
    ("smtp://127.0.0.1", ("127.0.0.1", 25, "plain", None, None)),
    ("smtp://mail.local:2525/", ("mail.local", 2525, "plain", None, None)),
    ("smtp+starttls://relay.example", ("relay.example", 587, "starttls", None, None)),
    ("smtp+starttls://u%40x:p%3Aw%2Fd@relay.example:25",
     ("relay.example", 25, "starttls", "u@x", "p:w/d")),
    ("smtps://user:secret@smtp.example", ("smtp.example", 465, "tls", "user", "secret")),
    ("SMTPS://user:secret@[::1]:1465", ("::1", 1465, "tls", "user", "secret")),
])
def test_smtp_url_forms(url: str, expected: tuple[object, ...]) -> None:
    target = SmtpTarget.parse(url)
    assert (target.host, target.port, target.security, target.username,
            target.password) == expected
    assert "secret" not in repr(target)


@pytest.mark.parametrize("url, problem", [
    ("http://mail.example", "must start with smtp://"),
    ("smtp+ssl://mail.example", "must start with smtp://"),
    ("smtp://", "names no host"),
    ("smtp://user:hunter2@mail.example", "only over TLS"),
    ("smtps://user@mail.example", "user:password@"),
    ("smtps://:hunter2@mail.example", "user:password@"),
    ("smtps://mail.example/inbox", "no path"),
    ("smtps://mail.example?x=1", "no path"),
    ("smtps://user:hunter2@mail.example:99999", "not a valid URL"),
])
def test_bad_smtp_urls_are_refused_without_quoting_them(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        SmtpTarget.parse(url)
    assert "hunter2" not in str(caught.value)


# Settings.



def test_mail_and_approval_defaults(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    dev = load_settings()
    assert dev.staff_approval_required is False
    assert dev.smtp_target is None and Mailer.from_settings(dev) is None
    assert dev.mail_sender.startswith("phivault@")
    monkeypatch.setenv("PHIVAULT_ENV", "prod")
    assert load_settings().staff_approval_required is True
    monkeypatch.setenv("PHIVAULT_STAFF_APPROVAL", "false")
    assert load_settings().staff_approval_required is False
    monkeypatch.setenv("PHIVAULT_ENV", "dev")
    monkeypatch.setenv("PHIVAULT_STAFF_APPROVAL", "true")
    assert load_settings().staff_approval_required is True
    monkeypatch.setenv("PHIVAULT_SMTP_URL", "")
    assert load_settings().smtp_target is None  # empty: no mail


def test_smtp_url_is_a_secret_with_a_file_variant(env: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "smtp-url"
    secret.write_text("smtps://mailer:s3cr3t-pass@smtp.example:465\n", encoding="utf-8")
    monkeypatch.setenv("PHIVAULT_SMTP_URL_FILE", str(secret))
    monkeypatch.setenv("PHIVAULT_MAIL_FROM", "Clinic Vault <vault@clinic.example>")
    settings = load_settings()
    assert settings.smtp_target == SmtpTarget("smtp.example", 465, "tls", "mailer",
                                              "s3cr3t-pass")
    assert "s3cr3t-pass" not in repr(settings) + str(settings) + repr(settings.smtp_target)
    mailer = Mailer.from_settings(settings)
    assert mailer is not None and mailer.sender == "Clinic Vault <vault@clinic.example>"
    monkeypatch.setenv("PHIVAULT_SMTP_URL", "smtp://127.0.0.1")
    with pytest.raises(ConfigError, match="^PHIVAULT_SMTP_URL_FILE: set either"):
        load_settings()


@pytest.mark.parametrize("variable, value, problem", [
    ("PHIVAULT_SMTP_URL", "smtp://user:hunter2@mail.example", "only over TLS"),
    ("PHIVAULT_SMTP_URL", "imap://mail.example", "must start with smtp://"),
    ("PHIVAULT_MAIL_FROM", "nobody", "must be an e-mail address"),
    ("PHIVAULT_MAIL_FROM", "a@b.example\r\nBcc: c@d.example", "must be an e-mail address"),
    ("PHIVAULT_STAFF_APPROVAL", "perhaps", "valid boolean"),
])
def test_bad_mail_settings_name_their_variable(env: dict[str, str], variable: str, value: str,
                                               problem: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable}: .*{problem}") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_prod_sends_in_clear_only_to_a_relay_on_this_host(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_ENV", "prod")
    for url in ("smtp://127.0.0.1:25", "smtp://localhost", "smtp://[::1]",
                "smtps://relay.example", "smtp+starttls://u:p@relay.example"):
        monkeypatch.setenv("PHIVAULT_SMTP_URL", url)
        assert load_settings().smtp_target is not None
    monkeypatch.setenv("PHIVAULT_SMTP_URL", "smtp://relay.example")
    with pytest.raises(ConfigError, match="^PHIVAULT_SMTP_URL: smtp:// .* this host only"):
        load_settings()


# What the messages say.

def test_messages_hold_what_their_reader_needs_and_no_more() -> None:
    mail = a_mail()
    assert TO not in repr(mail) and TOKEN not in repr(mail)
    assert TOKEN in mail.body and "2031-05-04 10:00 UTC" in mail.body
    assert "/api/v1/auth/setup" in mail.body
    at = datetime(2031, 1, 2, 3, 4, tzinfo=UTC)
    notice = break_glass_notice(uuid.uuid4(), "pat@example.org", at)
    assert "2031-01-02 03:04 UTC" in notice.body and "access log" in notice.body
    assert "pat@example.org" not in notice.body


# Delivery to a real server.

async def test_plain_delivery_and_headers() -> None:
    with smtp_server() as server:
        mailer = Mailer(SmtpTarget.parse(server.url()), "Clinic Vault <vault@clinic.example>")
        await mailer.send(a_mail())
    (got,) = server.inbox.received
    assert got.rcpt_tos == [TO] and got.mail_from == "vault@clinic.example"
    assert not got.tls and got.login is None
    message = got.message
    assert message["To"] == TO and message["Subject"] == "Your phivault account"
    assert message["From"] == "Clinic Vault <vault@clinic.example>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert str(message["Message-ID"]).endswith("@clinic.example>")
    assert TOKEN in got.text


async def test_starttls_with_a_login(tmp_path: Path) -> None:
    with smtp_server(tls_dir=tmp_path, login=("mailer", "p@ss word")) as server:
        assert server.cert is not None
        target = SmtpTarget.parse(server.url("smtp+starttls", "mailer:p%40ss%20word@"))
        await Mailer(target, SENDER, ssl_context=trusting(server.cert)).send(a_mail())
    (got,) = server.inbox.received
    assert got.tls and got.login == "mailer" and TOKEN in got.text


# aiosmtpd warns of AUTH without STARTTLS, not knowing that implicit TLS is TLS.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_implicit_tls_with_a_login(tmp_path: Path) -> None:
    with smtp_server(tls_dir=tmp_path, implicit_tls=True, login=("mailer", "pw")) as server:
        assert server.cert is not None
        target = SmtpTarget.parse(server.url("smtps", "mailer:pw@"))
        await Mailer(target, SENDER, ssl_context=trusting(server.cert)).send(a_mail())
    (got,) = server.inbox.received
    assert got.tls and got.login == "mailer"


async def failure_of(mailer: Mailer, runtime: Runtime, mail: Mail,
                     logs: io.StringIO) -> tuple[AuditEvent, dict[str, object]]:
    """Deliver (it must fail), and return the failure's audit event and warning."""
    assert await deliver(mailer, mail, runtime.unit_of_work) is False
    async with runtime.sessions() as session:
        event = (await session.execute(select(AuditEvent).where(
            AuditEvent.action == "MAIL_FAILURE", AuditEvent.resource_id == str(mail.user_id))
        )).scalar_one()
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    ours = [line for line in lines if line.get("logger") != "mail.log"]  # not the server's
    (warning,) = [line for line in ours if line["event"] == "mail_not_sent"]
    assert mail.to not in json.dumps(ours) and TOKEN not in json.dumps(ours)
    return event, warning


async def test_every_failure_is_a_code_a_warning_and_an_event(
        runtime: Runtime, tmp_path: Path, captured_logs: io.StringIO) -> None:
    closed = SmtpTarget.parse(f"smtp://127.0.0.1:{free_port()}")
    cases: list[tuple[str, Mailer, str]] = [("unreachable", Mailer(closed, SENDER), TO)]
    with smtp_server(refuse={"gone@clinic.example"}) as plain, \
            smtp_server(tls_dir=tmp_path, login=("mailer", "right")) as secured:
        assert secured.cert is not None
        trusted = trusting(secured.cert)
        cases += [
            ("refused", Mailer(SmtpTarget.parse(plain.url()), SENDER), "gone@clinic.example"),
            # STARTTLS demanded of a server that does not offer it: nothing goes in clear.
            ("tls_failed", Mailer(SmtpTarget.parse(plain.url("smtp+starttls")), SENDER), TO),
            # A certificate the system does not trust.
            ("tls_failed", Mailer(SmtpTarget.parse(secured.url("smtp+starttls")), SENDER), TO),
            ("auth_failed", Mailer(SmtpTarget.parse(secured.url("smtp+starttls", "mailer:wrong@")),
                                   SENDER, ssl_context=trusted), TO),
        ]
        for code, mailer, to in cases:
            captured_logs.seek(0)
            captured_logs.truncate()
            mail = a_mail(to)
            event, warning = await failure_of(mailer, runtime, mail, captured_logs)
            assert warning["kind"] == "invitation" and warning["failure"] == code, code
            assert warning["level"] == "warning"
            assert (event.outcome, event.actor_id, event.actor_role) == ("error", None, "system")
            assert event.event_metadata == {"kind": "invitation", "reason": code}
            assert event.resource_type == "user" and event.patient_id is None
        assert plain.inbox.received == [] and secured.inbox.received == []
