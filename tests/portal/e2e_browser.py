"""The real browser of the portal's end-to-end tests: Debian's Chromium (never a browser that
Playwright downloads) driven by Playwright, and what each page is checked for: no violation that
axe-core reports, no horizontal overflow at a phone's 375 px, no CSP violation, and a
screenshot at a desktop's width and a phone's.

Screenshots go to the folder named by PHIVAULT_TEST_SCREENSHOTS (`docs/screenshots` to refresh
the committed ones), else to the test run's temporary folder, so a plain `make test` leaves the
work tree as it was.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from playwright.async_api import ConsoleMessage, Page, ViewportSize

DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 375, "height": 812}
# A screenshot shows the whole page, down to this height (the audit trail's 50 rows would
# make a picture of megabytes).
SHOT_HEIGHT = 2400
# Playwright's own switches cover the rest (no first run, no background networking).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--disable-dev-shm-usage"]
AXE_SCRIPT = (resources.files("axe_playwright_python") / "axe.min.js").read_text(encoding="utf-8")


def find_chromium() -> tuple[str | None, str]:
    """The system's Chromium, or None and why not: PHIVAULT_TEST_CHROMIUM, else `chromium` or
    `chromium-browser` on PATH (what scripts/ensure-chromium installs)."""
    configured = os.environ.get("PHIVAULT_TEST_CHROMIUM")
    if configured:
        if os.access(configured, os.X_OK):
            return configured, ""
        return None, f"PHIVAULT_TEST_CHROMIUM={configured} is not an executable file"
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found, ""
    return None, ("Chromium is not installed: `make test` installs Debian's chromium through "
                  "scripts/ensure-chromium when it runs as root with apt-get; otherwise install "
                  "it, or set PHIVAULT_TEST_CHROMIUM")


def launch_args() -> list[str]:
    # Chromium's sandbox refuses to start as root; as anyone else it stays on.
    return CHROMIUM_ARGS + (["--no-sandbox"] if os.geteuid() == 0 else [])


def screenshot_folder(default: Path) -> Path:
    configured = os.environ.get("PHIVAULT_TEST_SCREENSHOTS")
    folder = Path(configured) if configured else default
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def describe(violations: list[dict[str, Any]]) -> str:
    """axe's violations, one line per rule and element."""
    lines = []
    for violation in violations:
        for node in violation["nodes"]:
            lines.append(f"{violation['id']} ({violation['impact']}): {violation['help']} at "
                         f"{', '.join(map(str, node['target']))}: {node['html'][:160]}")
    return "\n".join(lines)


# How wide the page is, and the first elements that stick out past the viewport (those inside
# a scrolling box, such as a wide table's wrapper, do not make the page scroll).
_OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > width + 1 && !e.closest('.table-wrap, pre'))
    .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '')
                          + ' ' + (e.textContent || '').trim().slice(0, 40));
  return [document.documentElement.scrollWidth - width, wide];
}"""


@dataclass
class Inspector:
    """Checks each page it is shown and keeps what it found, so one run reports every page's
    problems together (`problems`), then the test asserts there are none."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    _csp: dict[int, list[str]] = field(default_factory=dict)

    def watch(self, page: Page) -> None:
        """Record the CSP violations `page` reports on its console (an inline style or script
        in a template would be one)."""
        found = self._csp.setdefault(id(page), [])

        def on_console(message: ConsoleMessage) -> None:
            if "Content Security Policy" in message.text:
                found.append(message.text)
        page.on("console", on_console)

    async def check(self, page: Page, name: str) -> None:
        """The page as it is now: axe, CSP, a desktop screenshot, then at a phone's width no
        sideways scrolling and a phone screenshot (`name.png`, `name-phone.png`)."""
        await page.evaluate(AXE_SCRIPT)
        result = await page.evaluate(
            "() => axe.run(document, {resultTypes: ['violations']})")
        if result["violations"]:
            self.problems.append(f"{name} ({page.url}): axe:\n{describe(result['violations'])}")
        reported = self._csp.get(id(page), [])
        self.problems += [f"{name} ({page.url}): CSP: {text}" for text in reported]
        reported.clear()
        await self._shoot(page, f"{name}.png")
        size = page.viewport_size or DESKTOP
        await page.set_viewport_size(PHONE)
        try:
            overflow, wide = await page.evaluate(_OVERFLOW)
            if overflow > 0:
                self.problems.append(f"{name} ({page.url}): {overflow} px wider than a phone's "
                                     f"{PHONE['width']} px, because of {wide}")
            await self._shoot(page, f"{name}-phone.png")
        finally:
            await page.set_viewport_size(size)

    async def _shoot(self, page: Page, file: str) -> None:
        width, height = await page.evaluate(
            "() => [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
        await page.screenshot(path=self.folder / file, full_page=True, clip={
            "x": 0, "y": 0, "width": width, "height": min(height, SHOT_HEIGHT)})

    def assert_clean(self) -> None:
        assert not self.problems, "\n\n".join(self.problems)
