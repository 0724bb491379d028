"""Every audit action and outcome, in one place (SPEC §8). Routes never spell them as strings."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    ERROR = "error"


class Action(StrEnum):
    # Authentication and sessions.
    LOGIN_SUCCESS = "LOGIN_SUCCESS"
    LOGIN_FAILURE = "LOGIN_FAILURE"
    LOGOUT = "LOGOUT"
    TOKEN_REFRESH = "TOKEN_REFRESH"
    REFRESH_TOKEN_REUSE = "REFRESH_TOKEN_REUSE"
    SESSION_REVOKED = "SESSION_REVOKED"
    MFA_SETUP_STARTED = "MFA_SETUP_STARTED"
    MFA_ENABLED = "MFA_ENABLED"
    PASSWORD_CHANGED = "PASSWORD_CHANGED"
    ACCOUNT_SETUP = "ACCOUNT_SETUP"

    # Access control.
    ACCESS_DENIED = "ACCESS_DENIED"
    BREAK_GLASS = "BREAK_GLASS"
    # An auditor read a break-glass reason (PHI) through the audit API; patient_id is set.
    VIEW_BREAK_GLASS_REASON = "VIEW_BREAK_GLASS_REASON"
    # Refusals anyone can cause at will: written rate-bounded (audit/flood.py).
    MISSING_TOKEN = "MISSING_TOKEN"
    INVALID_TOKEN = "INVALID_TOKEN"
    RATE_LIMITED = "RATE_LIMITED"

    # Data-subject rights.
    CONSENT_CHANGED = "CONSENT_CHANGED"
    DATA_EXPORT = "DATA_EXPORT"
    ACCOUNT_ERASED = "ACCOUNT_ERASED"
    RESEARCH_EXPORT = "RESEARCH_EXPORT"

    # Integrity.
    INTEGRITY_FAILURE = "INTEGRITY_FAILURE"

    # User administration.
    CREATE_USER = "CREATE_USER"
    UPDATE_USER = "UPDATE_USER"
    IMPORT_USERS = "IMPORT_USERS"
    VIEW_USERS = "VIEW_USERS"
    # A second admin approved a pending staff account (SPEC §6); resource_id: the account.
    APPROVE_USER = "APPROVE_USER"
    # An admin (never the creator, with approval on) renewed a staff account's setup token.
    RENEW_SETUP_TOKEN = "RENEW_SETUP_TOKEN"
    # An invitation or a break-glass notice could not be mailed (ops/mail.py); by the system.
    MAIL_FAILURE = "MAIL_FAILURE"

    # Key operations.
    KEY_REWRAP = "KEY_REWRAP"
    KEY_REINDEX = "KEY_REINDEX"

    # The audit trail itself.
    VIEW_AUDIT_TRAIL = "VIEW_AUDIT_TRAIL"
    VERIFY_AUDIT_CHAIN = "VERIFY_AUDIT_CHAIN"
    AUDIT_CHECKPOINT = "AUDIT_CHECKPOINT"  # a signed head; resource_id is its seq
    EXPORT_AUDIT_TRAIL = "EXPORT_AUDIT_TRAIL"

    # PHI reads and writes: VIEW_/CREATE_/UPDATE_/DELETE_<RESOURCE>.
    VIEW_PROFILE = "VIEW_PROFILE"
    UPDATE_PROFILE = "UPDATE_PROFILE"
    VIEW_CONSULTATION = "VIEW_CONSULTATION"
    CREATE_CONSULTATION = "CREATE_CONSULTATION"
    UPDATE_CONSULTATION = "UPDATE_CONSULTATION"
    VIEW_MEDICAL_RECORD = "VIEW_MEDICAL_RECORD"
    CREATE_MEDICAL_RECORD = "CREATE_MEDICAL_RECORD"
    UPDATE_MEDICAL_RECORD = "UPDATE_MEDICAL_RECORD"
    VIEW_PRESCRIPTION = "VIEW_PRESCRIPTION"
    CREATE_PRESCRIPTION = "CREATE_PRESCRIPTION"
    VIEW_ATTACHMENT = "VIEW_ATTACHMENT"
    CREATE_ATTACHMENT = "CREATE_ATTACHMENT"
    VIEW_PAYMENT = "VIEW_PAYMENT"
    CREATE_PAYMENT = "CREATE_PAYMENT"
    VIEW_NOTIFICATION = "VIEW_NOTIFICATION"
    # The owner marked a notification read (resource_id: the notification).
    UPDATE_NOTIFICATION = "UPDATE_NOTIFICATION"
    VIEW_PATIENT_LIST = "VIEW_PATIENT_LIST"
    VIEW_ACCESS_LOG = "VIEW_ACCESS_LOG"
    VIEW_CONSENT = "VIEW_CONSENT"
    # The patient's care team (SPEC §7): listed; one doctor's relationship ended by the patient
    # (resource_id: the doctor).
    VIEW_CARE_TEAM = "VIEW_CARE_TEAM"
    DELETE_CARE_RELATIONSHIP = "DELETE_CARE_RELATIONSHIP"
