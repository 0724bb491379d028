"""Sign in to a phivault instance with `phivault.client` and show what the account may see.

Against the development instance: `make run` in one terminal, `make demo` in another (it prints
each demo person's email and password once), then for example:

    PHIVAULT_PASSWORD='...' .venv/bin/python examples/client_example.py jane.roe@demo.example
    .venv/bin/python examples/client_example.py gregory.house@demo.example --async

The password comes from `PHIVAULT_PASSWORD` or is asked for (never on the command line, where
other users of the machine could read it). A patient sees their chart and downloads their
attachments with `--save-to DIR`; a doctor sees their patients' charts and what phivault
refuses; an auditor verifies the audit trail; an admin lists the accounts.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from pathlib import Path

from phivault.client import (
    AsyncPhivaultClient,
    MfaEnrollmentRequired,
    MfaRequired,
    PhivaultClient,
    PhivaultClientError,
    attachment_file_name,
)


def sign_in(client: PhivaultClient, email: str, password: str) -> None:
    try:
        client.login(email, password)
    except MfaRequired:
        client.login(email, password, totp_code=input("TOTP code: ").strip())


def show_patient(client: PhivaultClient, patient_id: str, save_to: Path | None) -> None:
    records = client.list_records(patient_id)
    print(f"{records.total} records:")
    for record in records:
        print(f"  v{record.version} {record.diagnosis} ({', '.join(record.prescriptions)})")
    for prescription in client.list_prescriptions(patient_id):
        print(f"  prescription: {prescription.medication}, {prescription.dosage}")
    consents = client.consents()
    print(f"sharing my chart with my care team: {consents.data_sharing}")
    for member in client.my_care_team():
        print(f"  care team: {member.full_name} ({member.basis})")
    for entry in client.my_access_log(limit=5):
        print(f"  accessed: {entry.at:%Y-%m-%d %H:%M} {entry.actor_name or entry.actor_role} "
              f"{entry.action}{' (break-glass)' if entry.break_glass else ''}")
    for attachment in client.list_attachments(patient_id):
        print(f"  attachment: {attachment.filename!r}, {attachment.size} bytes")
        if save_to is not None:
            # Named by its id and type, never by `filename`: the uploader chose that, and a
            # name like "../../.bashrc" or "/etc/cron.d/x" would be written outside save_to.
            target = save_to / attachment_file_name(attachment.id, attachment.content_type)
            # Streamed to disk a chunk at a time, into a new file of mode 0600.
            written = client.download_attachment(attachment.id, target)
            print(f"    saved {written.size} bytes to {target}")


def show_doctor(client: PhivaultClient) -> None:
    for patient in client.my_patients():
        try:
            records = client.list_records(patient.id)
            print(f"  {patient.full_name}: {records.total} records")
        except PhivaultClientError as refused:  # e.g. NoConsent: typed, with the error code
            print(f"  {patient.full_name}: refused ({refused.code})")


def run(args: argparse.Namespace, password: str) -> None:
    with PhivaultClient(args.base_url, ca_file=args.ca_file) as client:
        sign_in(client, args.email, password)
        me = client.me()
        print(f"signed in as {me.full_name or me.email} ({me.role})")
        if me.role == "patient":
            show_patient(client, str(me.id), args.save_to)
        elif me.role == "doctor":
            show_doctor(client)
        elif me.role == "auditor":
            verdict = client.verify_audit()
            print(f"audit chain holds: {verdict.ok} ({verdict.events} events checked)")
            for event in client.search_audit(limit=5):
                print(f"  #{event.seq} {event.at:%H:%M:%S} {event.action} {event.outcome}")
        else:
            users = client.list_users()
            print(f"{users.total} accounts")
            for user in users:
                print(f"  {user.role:8} {user.status:8} {user.email}")
        client.logout()


async def run_async(args: argparse.Namespace, password: str) -> None:
    """The asynchronous client: several reads at once, sharing one session."""
    async with AsyncPhivaultClient(args.base_url, ca_file=args.ca_file) as client:
        await client.login(args.email, password)
        me, notifications, sessions = await asyncio.gather(
            client.me(), client.my_notifications(limit=5), client.my_sessions())
        print(f"signed in as {me.full_name or me.email} ({me.role}); "
              f"{len(sessions)} live sessions")
        for note in notifications:
            print(f"  {note.created_at:%Y-%m-%d} {note.text}")
        await client.logout()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("email", help="the account to sign in as")
    parser.add_argument("--base-url", default="https://127.0.0.1:8443")
    parser.add_argument("--ca-file", type=Path, default=Path("var/tls/cert.pem"),
                        help="the CA or self-signed certificate to trust (make run's)")
    parser.add_argument("--save-to", type=Path, help="a patient's attachments go here")
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="use the asynchronous client")
    args = parser.parse_args()
    password = os.environ.get("PHIVAULT_PASSWORD") or getpass.getpass(f"{args.email}'s password: ")
    try:
        if args.use_async:
            asyncio.run(run_async(args, password))
        else:
            run(args, password)
    except MfaEnrollmentRequired:
        print("this role must enrol TOTP first (start_mfa, enable_mfa)", file=sys.stderr)
        return 1
    except PhivaultClientError as error:
        # Every refusal carries its status, error code and request id (for the operator).
        print(f"phivault refused: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
