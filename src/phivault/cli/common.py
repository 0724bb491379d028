"""What every command shares: loading settings (exit 2 on a bad one), running async work with a
runtime, reporting failures as one line, and progress that suits a terminal or a log."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeRemainingColumn

from phivault.audit.export import ExportWriteError, private_output
from phivault.cli.dev_env import load_dev_environment
from phivault.config import ConfigError, Settings, load_settings
from phivault.db.engine import COMMAND_TIMEOUT_SECONDS
from phivault.errors import Unavailable, database_unavailable
from phivault.observability import configure_logging
from phivault.request_context import RequestContext, new_request_id, set_request
from phivault.runtime import Runtime

T = TypeVar("T")

err = Console(stderr=True, highlight=False, soft_wrap=True)
# The exit status of a command that could not reach its database.
DATABASE_UNAVAILABLE = 3


def command_group(help: str, **options: Any) -> typer.Typer:
    """A Typer app (the root, or a group such as `users`) with the house's help: Click's plain
    help, which shows a flag as `--dev` (Typer's Rich help prints `<bool>` beside every flag)
    and wraps each paragraph of a docstring as a whole (Rich keeps the docstring's own line
    breaks and breaks sentences in odd places), up to 100 columns on a wide terminal."""
    options.setdefault("no_args_is_help", True)
    return typer.Typer(help=help, rich_markup_mode=None,
                       context_settings={"max_content_width": 100}, **options)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit with `code`."""
    err.print(f"phivault: {message}", markup=False)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    """The settings from the environment (in a development instance's directory, with
    `./var/phivault.env` under it: `cli/dev_env.py`), or one line and exit 2."""
    note = load_dev_environment()
    if note is not None:
        err.print(note, markup=False)
    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), 2)


def run_with_runtime(command: str, work: Callable[[Runtime], Awaitable[T]],
                     settings: Settings | None = None, *, chain_first: bool = True,
                     command_timeout: float | None = COMMAND_TIMEOUT_SECONDS) -> T:
    """Run `work` with a runtime built from the environment, as the CLI's own request.

    First it chains what is queued (`chain_first`; not before migrations, when the tables may
    not exist yet), and on the way out it chains what the command wrote (`Runtime.close`).
    """
    settings = settings or settings_or_exit()
    # Log lines as JSON on stderr, redacted: standard output is the command's answer.
    configure_logging(settings.log_level)

    async def main() -> T:
        set_request(RequestContext(request_id=f"cli-{new_request_id()}",
                                   user_agent=f"phivault-cli/{command}"))
        runtime = Runtime.from_settings(settings, pool_size=2,
                                        command_timeout=command_timeout)
        try:
            # Events another process left queued (a command killed before it chained its
            # own) are chained before this command reads or writes the trail.
            if chain_first:
                await runtime.sequencer.flush()
            return await work(runtime)
        finally:
            await runtime.close()

    try:
        return asyncio.run(main())
    except Exception as exc:
        if database_unavailable(exc) or isinstance(exc, Unavailable):
            # One line and its own exit code: an outage is not "the chain does not hold"
            # (`audit verify` exits 1 for that) nor a bug.
            fail("the database is unavailable; nothing was done (try again when it is back)",
                 DATABASE_UNAVAILABLE)
        raise


def run_writing(command: str, out: Path,
                work: Callable[[Runtime, IO[bytes]], Awaitable[T]]) -> T:
    """`run_with_runtime`, with `out` open for `work` to write: created 0600 beside its final
    name and renamed into place only when `work` succeeds (`private_output`). A file that
    cannot be created is one line and exit 2; a failed write raises `ExportWriteError`."""
    with ExitStack() as stack:
        try:
            sink = stack.enter_context(private_output(out))
        except ExportWriteError as exc:
            fail(str(exc), 2)
        return run_with_runtime(command, lambda runtime: work(runtime, sink))


class Reporter:
    """Progress for long jobs: a Rich bar on a terminal, plain lines otherwise."""

    def __init__(self, progress: Progress | None, task: TaskID | None, label: str,
                 total: int) -> None:
        self._progress, self._task, self._label, self._total = progress, task, label, total
        self._done = 0
        self._last_line = -1

    def advance(self, amount: int) -> None:
        self._done += amount
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self._done)
            return
        percent = int(100 * self._done / self._total) if self._total else 100
        if percent // 10 != self._last_line // 10 or self._done >= self._total:
            self._last_line = percent
            print(f"{self._label}: {self._done}/{self._total} ({percent}%)", file=sys.stderr,
                  flush=True)


@contextmanager
def progress(label: str, total: int) -> Iterator[Reporter]:
    if sys.stderr.isatty():
        bar = Progress("[progress.description]{task.description}", BarColumn(),
                       MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=False)
        with bar:
            task = bar.add_task(label, total=total)
            yield Reporter(bar, task, label, total)
    else:
        yield Reporter(None, None, label, total)
