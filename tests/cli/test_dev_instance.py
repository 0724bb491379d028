"""In a development instance's directory, commands find `./var/phivault.env` by themselves (the
environment still wins), never in prod; `init` hints at the first admin only until one exists.

The loader's rules are tested in-process too (`load_dev_environment` with an environment of the
test's own), against the settings' own reading of names: in any case, and `./.env` as
python-dotenv reads it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from phivault.cli.dev_env import load_dev_environment, merge_env_file, read_env_file
from tests.helpers import run_cli

PASSPHRASE = "correct horse battery staple"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PHIVAULT_")}
    env.update(extra)
    return env


def _one_line(stderr: str) -> str:
    (line,) = stderr.splitlines()
    return line


def _dev_instance(cwd: Path) -> Path:
    made = run_cli("init", "--dev", env=_env(), cwd=cwd)
    assert made.returncode == 0, made.stderr
    return cwd / "var" / "phivault.env"


def test_commands_load_the_dev_instance_by_themselves(tmp_path: Path) -> None:
    _dev_instance(tmp_path)
    status = run_cli("keys", "status", "--json", env=_env(), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["active"].startswith("dev-")
    assert "using the development instance's settings in var/phivault.env" in status.stderr


def test_the_environment_wins_over_the_dev_file(tmp_path: Path) -> None:
    _dev_instance(tmp_path)
    other = "sqlite+aiosqlite:///elsewhere.db"
    migrated = run_cli("migrate", env=_env(PHIVAULT_DATABASE_URL=other), cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert "migrated from empty" in migrated.stdout
    assert (tmp_path / "elsewhere.db").exists()


def test_an_environment_with_keys_of_its_own_is_left_alone(tmp_path: Path) -> None:
    _dev_instance(tmp_path)
    partial = run_cli("keys", "status", env=_env(PHIVAULT_MASTER_KEYS="m:" + "A" * 43),
                      cwd=tmp_path)
    assert partial.returncode == 2
    assert _one_line(partial.stderr).startswith(
        "phivault: PHIVAULT_INDEX_KEY: is required but not set")


def test_prod_never_loads_the_dev_file(tmp_path: Path) -> None:
    _dev_instance(tmp_path)
    for args in (["keys", "status"], ["serve", "--port", "1"]):
        refused = run_cli(*args, env=_env(PHIVAULT_ENV="prod"), cwd=tmp_path)
        assert refused.returncode == 2
        assert _one_line(refused.stderr).startswith(
            "phivault: PHIVAULT_MASTER_KEYS: is required but not set")
    (tmp_path / ".env").write_text("PHIVAULT_ENV=prod\n", encoding="utf-8")
    dotenv_prod = run_cli("keys", "status", env=_env(), cwd=tmp_path)
    assert dotenv_prod.returncode == 2 and "PHIVAULT_MASTER_KEYS" in dotenv_prod.stderr


def test_only_a_dev_file_of_the_callers_own_is_loaded(tmp_path: Path) -> None:
    env_file = _dev_instance(tmp_path)
    text = env_file.read_text(encoding="utf-8")
    env_file.write_text(text.replace("PHIVAULT_ENV=dev\n", ""), encoding="utf-8")
    unmarked = run_cli("keys", "status", env=_env(), cwd=tmp_path)
    assert unmarked.returncode == 2
    assert "not a development instance's file" in unmarked.stderr
    env_file.write_text(text, encoding="utf-8")
    env_file.chmod(0o666)
    shared = run_cli("keys", "status", env=_env(), cwd=tmp_path)
    assert shared.returncode == 2 and "others may write it" in shared.stderr
    env_file.chmod(0o600)
    assert run_cli("keys", "status", env=_env(), cwd=tmp_path).returncode == 0


def test_no_dev_file_changes_nothing(tmp_path: Path) -> None:
    missing = run_cli("keys", "status", env=_env(), cwd=tmp_path)
    assert missing.returncode == 2
    assert _one_line(missing.stderr).startswith(
        "phivault: PHIVAULT_MASTER_KEYS: is required but not set")


def test_the_first_admin_hint_shows_until_an_admin_exists(tmp_path: Path) -> None:
    first = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "no admin yet" in first.stdout and "users create" in first.stdout
    # The hint's command works as printed: no environment to source first.
    doctor = run_cli("users", "create", "doc@clinic.example", "--role", "doctor",
                     "--full-name", "Dr Dee", "--password-stdin", env=_env(), cwd=tmp_path,
                     stdin=PASSPHRASE + "\n")
    assert doctor.returncode == 0, doctor.stderr
    assert "no admin yet" in run_cli("init", "--dev", env=_env(), cwd=tmp_path).stdout
    admin = run_cli("users", "create", "you@clinic.example", "--role", "admin",
                    "--full-name", "Ada Admin", "--password-stdin", env=_env(), cwd=tmp_path,
                    stdin=PASSPHRASE + "\n")
    assert admin.returncode == 0, admin.stderr
    again = run_cli("init", "--dev", env=_env(), cwd=tmp_path)
    assert again.returncode == 0 and "reusing" in again.stdout
    assert "no admin yet" not in again.stdout and "users create" not in again.stdout


def test_a_lower_case_prod_keeps_the_dev_file_out(tmp_path: Path) -> None:
    # The settings read names in any case: `phivault_env=prod` is prod.
    _dev_instance(tmp_path)
    refused = run_cli("keys", "status", env=_env(phivault_env="prod"), cwd=tmp_path)
    assert refused.returncode == 2
    assert _one_line(refused.stderr).startswith(
        "phivault: PHIVAULT_MASTER_KEYS: is required but not set")
    # `init --dev` merges the file under the operator's settings: prod stays prod, and
    # refuses the file's dev keys.
    init = run_cli("init", "--dev", env=_env(phivault_env="prod"), cwd=tmp_path)
    assert init.returncode == 2
    assert "PHIVAULT_ENV=prod needs keys from `phivault keys generate`" in init.stderr


# In-process: the loader's rules, with a dev file written by the test.

DEV_FILE = ("# written by the test\nPHIVAULT_ENV=dev\nPHIVAULT_MASTER_KEYS=dev-master\n"
            "PHIVAULT_INDEX_KEY=dev-index\nPHIVAULT_DATABASE_URL=sqlite+aiosqlite:///var/dev.db\n")
DEV_VALUES = {"PHIVAULT_MASTER_KEYS": "dev-master", "PHIVAULT_INDEX_KEY": "dev-index",
              "PHIVAULT_DATABASE_URL": "sqlite+aiosqlite:///var/dev.db"}
NOBODY = 65534


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A development instance's directory (var/ 0700, var/phivault.env 0600), as the cwd."""
    var = tmp_path / "var"
    var.mkdir()
    var.chmod(0o700)
    env_file = var / "phivault.env"
    env_file.write_text(DEV_FILE, encoding="utf-8")
    env_file.chmod(0o600)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loaded(note: str | None) -> bool:
    return note == "note: using the development instance's settings in var/phivault.env"


def test_the_dev_file_loads_under_nothing_else(here: Path) -> None:
    environ = {"PATH": "/bin"}
    assert _loaded(load_dev_environment(environ))
    # The file's PHIVAULT_ENV=dev marks it; it never sets PHIVAULT_ENV (dev is the default).
    assert environ == {"PATH": "/bin", **DEV_VALUES}
    explicit = {"PHIVAULT_ENV": "dev"}
    assert _loaded(load_dev_environment(explicit))
    assert explicit == {"PHIVAULT_ENV": "dev", **DEV_VALUES}


@pytest.mark.parametrize("name", ["PHIVAULT_ENV", "phivault_env", "Phivault_Env"])
@pytest.mark.parametrize("value", ["prod", "Prod", " dev", "", "staging"])
def test_any_env_but_dev_keeps_the_dev_file_out(here: Path, name: str, value: str) -> None:
    environ = {name: value}
    assert load_dev_environment(environ) is None
    assert environ == {name: value}


def test_one_prod_among_the_spellings_keeps_the_dev_file_out(here: Path) -> None:
    environ = {"PHIVAULT_ENV": "dev", "phivault_env": "prod"}
    assert load_dev_environment(environ) is None
    assert environ == {"PHIVAULT_ENV": "dev", "phivault_env": "prod"}


@pytest.mark.parametrize("name", ["phivault_master_keys", "Phivault_Jwt_Keys",
                                  "phivault_audit_key_file"])
def test_the_operators_keys_in_any_case_keep_the_dev_file_out(here: Path, name: str) -> None:
    environ = {name: "the operator's"}
    assert load_dev_environment(environ) is None
    assert environ == {name: "the operator's"}


@pytest.mark.parametrize("dotenv", [
    "# the production instance\nexport phivault_env='prod'  # not the dev one\n",
    'PHIVAULT_ENV="prod" # production\n',
    "export\tPHIVAULT_MASTER_KEYS=m:the-operators\n",
    "phivault_index_key = \"the operator's\"\n",
])
def test_dotenv_is_read_as_the_settings_read_it(here: Path, dotenv: str) -> None:
    (here / ".env").write_text(dotenv, encoding="utf-8")
    environ: dict[str, str] = {}
    assert load_dev_environment(environ) is None
    assert environ == {}


def test_what_the_operator_set_in_any_case_wins_the_merge(here: Path) -> None:
    # `init --dev` merges the file whatever the operator set: their names, in any case (or
    # as `<NAME>_FILE`), keep their values, and the file never sets PHIVAULT_ENV.
    (here / ".env").write_text("phivault_index_key=from-dotenv\n", encoding="utf-8")
    environ = {"phivault_env": "prod", "phivault_master_keys": "mine",
               "PHIVAULT_DATABASE_URL_FILE": "/run/secrets/db"}
    merge_env_file(read_env_file(Path("var/phivault.env")), environ)
    assert environ == {"phivault_env": "prod", "phivault_master_keys": "mine",
                       "PHIVAULT_DATABASE_URL_FILE": "/run/secrets/db"}


def test_the_dev_file_is_read_as_dotenv_reads_it(here: Path) -> None:
    env_file = here / "var" / "phivault.env"
    env_file.write_text(
        DEV_FILE + "export PHIVAULT_REDIS_PREFIX='dev' # a comment\nphivault_log_level=debug\n"
        "OTHER=ignored\n", encoding="utf-8")
    assert read_env_file(env_file) == {
        "PHIVAULT_ENV": "dev", **DEV_VALUES, "PHIVAULT_REDIS_PREFIX": "dev",
        "PHIVAULT_LOG_LEVEL": "debug"}


def _refused(note: str | None, why: str) -> None:
    assert note == f"note: var/phivault.env not loaded: {why}"


def test_a_var_others_may_write_is_refused(here: Path) -> None:
    (here / "var").chmod(0o777)
    environ: dict[str, str] = {}
    _refused(load_dev_environment(environ), "others may write var/")
    assert environ == {}
    (here / "var").chmod(0o770)
    _refused(load_dev_environment(environ), "others may write var/")
    (here / "var").chmod(0o755)
    assert _loaded(load_dev_environment(environ))


def test_a_symbolic_link_is_never_followed(here: Path) -> None:
    other = here / "other"
    other.mkdir(mode=0o700)
    (here / "var" / "phivault.env").rename(other / "phivault.env")
    (here / "var" / "phivault.env").symlink_to(other / "phivault.env")
    environ: dict[str, str] = {}
    _refused(load_dev_environment(environ), "it is a symbolic link")
    assert environ == {}
    (here / "var" / "phivault.env").unlink()
    (here / "var").rmdir()
    (here / "var").symlink_to(other)
    _refused(load_dev_environment(environ), "var/ is a symbolic link")
    assert environ == {}


def test_only_a_regular_file_is_read(here: Path) -> None:
    env_file = here / "var" / "phivault.env"
    env_file.unlink()
    os.mkfifo(env_file, 0o600)
    # A FIFO would block a plain open until a writer came.
    _refused(load_dev_environment({}), "it is not a regular file")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_a_var_or_file_of_another_user_is_refused(here: Path) -> None:
    os.chown(here / "var" / "phivault.env", NOBODY, -1)
    _refused(load_dev_environment({}), "it belongs to another user")
    os.chown(here / "var" / "phivault.env", os.getuid(), -1)
    os.chown(here / "var", NOBODY, -1)
    _refused(load_dev_environment({}), "var/ belongs to another user")


def test_no_var_or_no_file_is_not_considered(here: Path) -> None:
    (here / "var" / "phivault.env").unlink()
    assert load_dev_environment({}) is None
    (here / "var").rmdir()
    assert load_dev_environment({}) is None
    (here / "var").write_text("not a directory", encoding="utf-8")
    assert load_dev_environment({}) is None
    assert stat.S_ISREG((here / "var").lstat().st_mode)
