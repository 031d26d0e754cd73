"""A real headless browser for the web pages: Debian's Chromium driven through Selenium.

Selenium is synchronous and the relay under test runs on the test's event loop, so every
browser call here runs in a worker thread (`await page.open(...)`): the loop keeps serving the
pages the browser asks for. Selenium Manager never runs: the driver is the system
chromedriver, since no browser download can work here.

Screenshots go to `artifacts/screenshots/` (gitignored) for CI to keep.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.mta import require_program

__all__ = ["A11Y_AUDIT", "SCREENSHOTS", "Page", "launch_chromium"]

SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)
WAIT = 15.0

T = TypeVar("T")


def launch_chromium() -> WebDriver:
    """Chromium and the system chromedriver; skipped if missing (failed under CI=true)."""
    binary = require_program("chromium", "chromium")
    driver_path = require_program("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT)
    return driver


# Accessibility basics every page must pass: one h1, no skipped heading level, every form control
# labelled, a main landmark, a language, headers on tables, names on links, buttons and images.
A11Y_AUDIT = """
const problems = [];
if (!document.documentElement.lang) problems.push("html has no lang");
if (!document.title.trim()) problems.push("page has no title");
if (document.querySelectorAll("main").length !== 1) problems.push("not exactly one main");
const h1 = document.querySelectorAll("h1").length;
if (h1 !== 1) problems.push(h1 + " h1 elements");
let last = 0;
for (const h of document.querySelectorAll("h1, h2, h3, h4, h5, h6")) {
  const level = Number(h.tagName[1]);
  if (level > last + 1) problems.push(h.tagName + " '" + h.textContent.trim() + "' skips a level");
  last = level;
}
const controls = "input:not([type=hidden]):not([type=submit]):not([type=button]), select, textarea";
for (const el of document.querySelectorAll(controls)) {
  const label = el.id && document.querySelector('label[for="' + CSS.escape(el.id) + '"]');
  const named = (label && label.textContent.trim()) || el.closest("label")
    || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby");
  if (!named) problems.push("unlabelled " + el.tagName.toLowerCase() + " " + el.name);
}
for (const t of document.querySelectorAll("table")) {
  if (!t.querySelector("th")) problems.push("table without header cells");
}
for (const a of document.querySelectorAll("a[href]")) {
  if (!a.textContent.trim() && !a.getAttribute("aria-label")) problems.push("link without a name");
}
for (const b of document.querySelectorAll("button")) {
  if (!b.textContent.trim() && !b.getAttribute("aria-label")) problems.push("unnamed button");
}
for (const c of document.querySelectorAll("img, canvas, svg")) {
  if (!c.getAttribute("alt") && !c.getAttribute("aria-label")) problems.push("image without text");
}
const ids = Array.from(document.querySelectorAll("[id]"), e => e.id);
for (const id of new Set(ids)) {
  if (ids.filter(x => x === id).length > 1) problems.push("duplicate id " + id);
}
return problems;
"""


_TEXT = "e => e.innerText.replace(/\\s+/g, ' ').trim()"
_TEXTS = f"return Array.from(document.querySelectorAll(arguments[0]), {_TEXT});"
_FIND = f"""
const text = {_TEXT};
for (const e of document.querySelectorAll(arguments[0])) {{
  if (arguments[1] === null || text(e) === arguments[1]) return e;
}}
return null;
"""


class Page:
    """One browser tab pointed at one server; every call runs off the event loop."""

    def __init__(self, driver: WebDriver, base: str) -> None:
        self.driver = driver
        self.base = base

    async def _do(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(functools.partial(fn, *args))

    # --- navigation --------------------------------------------------------

    async def open(self, path: str) -> None:
        await self._do(self.driver.get, self.base + path)

    def _follow(self, action: Callable[[], None]) -> None:
        """Run `action` and wait until the browser has loaded the page it leads to."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        action()

        def loaded(driver: WebDriver) -> bool:
            try:
                old.tag_name  # noqa: B018 - raises once the old page is gone
                return False
            except StaleElementReferenceException:
                return driver.execute_script("return document.readyState") == "complete"

        WebDriverWait(self.driver, WAIT, poll_frequency=0.02).until(loaded)

    async def click(self, css: str, *, text: str | None = None) -> None:
        """Click the first element matching `css` (and whose text is `text`), then wait."""

        def go() -> None:
            element = self._element(css, text)
            self._follow(element.click)

        await self._do(go)

    async def press(self, *keys: str, navigates: bool = False) -> None:
        """Keys sent to whatever has focus, as a keyboard user types them."""

        def go() -> None:
            def send() -> None:
                self.driver.switch_to.active_element.send_keys(*keys)

            if navigates:
                self._follow(send)
            else:
                send()

        await self._do(go)

    # --- reading -----------------------------------------------------------

    def _element(self, css: str, text: str | None = None) -> WebElement:
        """One round trip to the browser, however many elements match."""
        element = self.driver.execute_script(_FIND, css, text)
        if element is None:
            wanted = f" with text {text!r}" if text is not None else ""
            raise AssertionError(f"no {css!r}{wanted} on {self.driver.current_url}")
        return element  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    async def path(self) -> str:
        url = await self._do(lambda: str(self.driver.current_url))
        return url.removeprefix(self.base)

    async def text(self, css: str) -> str:
        """The visible text of the first match, whitespace collapsed as a reader sees it."""
        texts = await self.texts(css)
        if not texts:
            raise AssertionError(f"no {css!r} on {await self.path()}")
        return texts[0]

    async def texts(self, css: str) -> list[str]:
        found: list[str] = await self.script(_TEXTS, css)
        return found

    async def attribute(self, css: str, name: str) -> str | None:
        return await self._do(lambda: self._element(css).get_attribute(name))

    async def source(self) -> str:
        return await self._do(lambda: str(self.driver.page_source))

    async def script(self, js: str, *args: Any) -> Any:
        return await self._do(self.driver.execute_script, js, *args)

    async def focused(self) -> dict[str, str]:
        """What has keyboard focus: tag, id, name, text and class."""
        result: dict[str, str] = await self.script(
            "const e = document.activeElement; return {tag: e.tagName.toLowerCase(),"
            " id: e.id || '', name: e.name || '', text: (e.textContent || '').trim(),"
            " cls: e.className || '', outline: getComputedStyle(e).outlineStyle};"
        )
        return result

    async def accessibility_problems(self) -> list[str]:
        problems: list[str] = await self.script(A11Y_AUDIT)
        return problems

    async def console_errors(self) -> list[str]:
        """SEVERE browser log entries since the last call: script errors, CSP refusals, 404s."""
        entries = await self._do(self.driver.get_log, "browser")
        return [e["message"] for e in entries if e["level"] == "SEVERE"]

    async def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        await self._do(self.driver.save_screenshot, str(path))
        return path
