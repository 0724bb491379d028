"""A typed Python client of phivault's HTTP API, for app developers: synchronous and asynchronous.

It imports nothing of the server but its public response schemas, so an app needs only httpx
and pydantic (both dependencies of phivault). It keeps the session's tokens fresh by itself,
raises one exception class per kind of refusal, and streams attachments both ways. It takes
no answer on trust: each is read within limits and parsed into its model, or refused with a
typed error that quotes none of it (`answers.py`). See `docs/client.md`.

    from phivault.client import PhivaultClient

    with PhivaultClient("https://127.0.0.1:8443", ca_file="var/tls/cert.pem") as client:
        client.login("jane.roe@demo.example", password)
        for record in client.list_records(client.me().id):
            print(record.diagnosis)
"""

from phivault.client.aio import AsyncPhivaultClient
from phivault.client.downloads import attachment_file_name
from phivault.client.errors import (
    AnswerTimedOut,
    AnswerTooLarge,
    AuthenticationFailed,
    BadRequest,
    Conflict,
    ConnectionFailed,
    EmailTaken,
    FieldProblem,
    Forbidden,
    IntegrityFailure,
    InvalidAnswer,
    InvalidCredentials,
    InvalidRequest,
    InvalidToken,
    MalformedToken,
    MfaEnrollmentRequired,
    MfaRequired,
    NoCareRelationship,
    NoConsent,
    NotFound,
    NotReady,
    NotSignedIn,
    PayloadTooLarge,
    PhivaultClientError,
    RateLimited,
    RequestTimeout,
    ServerError,
    SessionRevoked,
    TokenReuseDetected,
    Unauthenticated,
    Unavailable,
    UnexpectedRedirect,
    UnsupportedMediaType,
    ValidationFailed,
    WeakPassword,
)
from phivault.client.models import DownloadedFile, Page
from phivault.client.routes import UNSET
from phivault.client.sync import PhivaultClient
from phivault.client.tokens import Tokens

__all__ = [
    "UNSET", "AnswerTimedOut", "AnswerTooLarge", "AsyncPhivaultClient", "AuthenticationFailed",
    "BadRequest", "Conflict", "ConnectionFailed", "DownloadedFile", "EmailTaken", "FieldProblem",
    "Forbidden", "IntegrityFailure", "InvalidAnswer", "InvalidCredentials", "InvalidRequest",
    "InvalidToken", "MalformedToken", "MfaEnrollmentRequired", "MfaRequired",
    "NoCareRelationship", "NoConsent", "NotFound", "NotReady", "NotSignedIn", "Page",
    "PayloadTooLarge", "PhivaultClient", "PhivaultClientError", "RateLimited", "RequestTimeout",
    "ServerError", "SessionRevoked", "TokenReuseDetected", "Tokens", "Unauthenticated",
    "Unavailable", "UnexpectedRedirect", "UnsupportedMediaType", "ValidationFailed",
    "WeakPassword", "attachment_file_name",
]
