"""The development instance's settings: `./var/phivault.env`, which `phivault init --dev` writes
and which commands run from that directory load by themselves.

A command loads it only when nothing else says which instance it is for, read as the settings
read it (names in any case; `./.env` through python-dotenv): not when the environment or `./.env`
names any of the instance's keys (or their `_FILE` forms), nor when any spelling of
`PHIVAULT_ENV` there says anything but `dev`. It loads only a file that `init --dev` made (it
says `PHIVAULT_ENV=dev`), opened without following a symbolic link and checked on the open
descriptor: a regular file, in a `var/` directory that is no symbolic link, both the caller's and
neither writable by anyone else. What the environment and `./.env` set always wins over the
file, and the file never sets `PHIVAULT_ENV` (dev is the settings' default).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path

from dotenv import dotenv_values

VAR = Path("var")
DEV_ENV_NAME = "phivault.env"
DEV_ENV_FILE = VAR / DEV_ENV_NAME
DOTENV_FILE = Path(".env")
PREFIX = "PHIVAULT_"
ENV_VARIABLE = "PHIVAULT_ENV"
DEV = "dev"
# The settings that say which instance a command acts on: given any of them (or its `_FILE`
# form), the caller has described an instance of their own.
INSTANCE_VARIABLES = ("PHIVAULT_MASTER_KEYS", "PHIVAULT_INDEX_KEY", "PHIVAULT_AUDIT_KEY",
                      "PHIVAULT_JWT_KEYS")
# POSIX's; a system without them (Windows) never loads the file, but still imports this module.
_SAFE_OPEN = all(hasattr(os, flag) for flag in ("O_NOFOLLOW", "O_DIRECTORY", "O_CLOEXEC"))


class DevFileRefused(Exception):
    """`./var/phivault.env` is there but must not be trusted with keys; `str()` says why."""


def _phivault_names(pairs: Mapping[str, str | None]) -> list[tuple[str, str | None]]:
    """The `PHIVAULT_*` entries of `pairs`, named in upper case: the settings read a name in
    any case (`phivault_env` is `PHIVAULT_ENV`)."""
    return [(name.upper(), value) for name, value in pairs.items()
            if name.upper().startswith(PREFIX)]


def parse_env_text(text: str) -> dict[str, str]:
    """The `PHIVAULT_*` assignments of an env file's text, names in upper case, read by
    python-dotenv as the settings read `./.env` (`export`, quotes, comments). Values are taken
    literally: a dev file's `${...}` pulls in nothing from the environment."""
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {name: value for name, value in _phivault_names(values) if value is not None}


def read_env_file(path: Path) -> dict[str, str]:
    """The `PHIVAULT_*` assignments of the env file at `path` (see `parse_env_text`)."""
    return parse_env_text(path.read_text(encoding="utf-8"))


def _configured(environ: Mapping[str, str]) -> list[tuple[str, str | None]] | None:
    """What the caller configured themselves, every spelling of a name kept: the environment's
    `PHIVAULT_*` names and those of `./.env` (read as the settings read it). None when `./.env`
    is there but cannot be read (the settings report that in their own words), or is a FIFO
    (reading it here would take its content from the settings)."""
    configured = _phivault_names(environ)
    if DOTENV_FILE.is_fifo():
        return None
    if DOTENV_FILE.is_file():
        try:
            configured += _phivault_names(dotenv_values(DOTENV_FILE, encoding="utf-8"))
        except (OSError, UnicodeError):
            return None
    return configured


def merge_env_file(values: dict[str, str],
                   environ: MutableMapping[str, str] | None = None) -> None:
    """Add `values` to the environment under what the caller configured: a name the
    environment or `./.env` gives in any case (or in its `_FILE` form) keeps the caller's value,
    and `PHIVAULT_ENV` is never added. Child processes (`serve --workers N`) inherit the
    result."""
    environ = os.environ if environ is None else environ
    configured = _configured(environ)
    if configured is None:
        return
    taken = {name for name, _ in configured}
    for name, value in values.items():
        name = name.upper()
        if (not value or name == ENV_VARIABLE or name in taken or f"{name}_FILE" in taken
                or name.removesuffix("_FILE") in taken):
            continue
        environ[name] = value


def _not_trusted(info: os.stat_result, what: str) -> str | None:
    """Why a file or directory (`what`, by its `fstat`) must not be trusted with keys."""
    if info.st_uid != os.geteuid():
        return f"{what} belongs to another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others may write {what}"
    return None


def _open_flags() -> int:
    return os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def _var_directory() -> Iterator[int | None]:
    """A descriptor of `./var` itself (never where a symbolic link points), or None when there
    is no dev file to speak of."""
    if not _SAFE_OPEN:
        if DEV_ENV_FILE.exists():
            raise DevFileRefused("this system cannot open it without following links")
        yield None
        return
    try:
        directory = os.open(VAR, _open_flags() | os.O_DIRECTORY)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or not DEV_ENV_FILE.exists():
            yield None
            return
        if VAR.is_symlink():
            raise DevFileRefused(f"{VAR}/ is a symbolic link") from None
        raise DevFileRefused(f"{VAR}/ cannot be opened ({exc.strerror})") from None
    try:
        yield directory
    finally:
        os.close(directory)


def read_dev_env_file() -> dict[str, str] | None:
    """The assignments of `./var/phivault.env`, or None when there is none.

    Opened once, relative to a descriptor of `./var`, following no symbolic link, and checked on
    the descriptors themselves, so what is checked is what is read. Raises `DevFileRefused`
    when the file is there but must not be trusted.
    """
    with _var_directory() as directory:
        if directory is None:
            return None
        problem = _not_trusted(os.fstat(directory), f"{VAR}/")
        if problem is not None:
            try:
                os.stat(DEV_ENV_NAME, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                return None
            raise DevFileRefused(problem)
        try:
            # O_NONBLOCK: a FIFO would otherwise block the open until a writer came.
            descriptor = os.open(DEV_ENV_NAME, _open_flags() | os.O_NONBLOCK, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Linux says ELOOP for a symbolic link under O_NOFOLLOW, FreeBSD EMLINK.
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise DevFileRefused("it is a symbolic link") from None
            raise DevFileRefused(f"it cannot be opened ({exc.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DevFileRefused("it is not a regular file")
        problem = _not_trusted(info, "it")
        if problem is not None:
            raise DevFileRefused(problem)
        try:
            return parse_env_text(handle.read().decode("utf-8"))
        except (OSError, UnicodeError):
            raise DevFileRefused("it cannot be read") from None


def load_dev_environment(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Load `./var/phivault.env` into the environment when this command is meant for the
    development instance in this directory (see the module's docstring). Returns a note for
    the operator when the file was loaded or refused, None when it was not considered."""
    environ = os.environ if environ is None else environ
    configured = _configured(environ)
    if configured is None:
        return None
    if any(name == ENV_VARIABLE and value != DEV for name, value in configured):
        return None
    names = {name for name, _ in configured}
    if any(name in names or f"{name}_FILE" in names for name in INSTANCE_VARIABLES):
        return None
    try:
        values = read_dev_env_file()
    except DevFileRefused as refused:
        return f"note: {DEV_ENV_FILE} not loaded: {refused}"
    if values is None:
        return None
    if values.get(ENV_VARIABLE) != DEV:
        return (f"note: {DEV_ENV_FILE} not loaded: it is not a development instance's file "
                f"(no {ENV_VARIABLE}={DEV})")
    merge_env_file(values, environ)
    return f"note: using the development instance's settings in {DEV_ENV_FILE}"
