"""Log review in a real browser: the questions support staff ask, answered by clicking.

Real mail goes through a real relay (repeats, a conflict, a held message); headless Chromium
then reads the pages the way a person does, through Selenium. Screenshots of each step land in
`artifacts/screenshots/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from selenium.webdriver.common.keys import Keys

from tests.browser import Page
from tests.conftest import (
    WEB_USERS,
    MakeRelay,
    MakeWeb,
    Relay,
    Upstream,
    WebServer,
    make_message,
    queued_id,
    repeat_id,
    send,
)

Browse = Callable[[WebServer], Page]


async def clean(page: Page) -> None:
    """Every page a test visits passes the accessibility basics and logs no browser errors."""
    assert await page.accessibility_problems() == [], await page.path()
    assert await page.console_errors() == [], await page.path()


def query(path: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(path).query)


async def test_a_repeat_is_found_by_recipient_and_followed_to_its_original_and_back(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb, browse: Browse
) -> None:
    relay = await make_relay()
    receipt = make_message("Your receipt", to="alice@example.org", message_id="<r-1@shop.test>")
    original = queued_id(await send(relay.port, receipt))
    first_repeat = repeat_id(await send(relay.port, receipt, source="127.0.0.2"))
    second_repeat = repeat_id(await send(relay.port, receipt, source="127.0.0.2"))
    invoice = make_message("Invoice 7", "Total: 10 EUR\n", extra={"Idempotency-Key": "invoice-7"})
    invoice_id = queued_id(await send(relay.port, invoice, rcpts=("bob@example.org",)))
    changed = make_message("Invoice 7", "Total: 12 EUR\n", extra={"Idempotency-Key": "invoice-7"})
    conflict = await send(relay.port, changed, rcpts=("bob@example.org",))
    assert conflict.code == 554 and invoice_id in conflict.text
    queued_id(await send(relay.port, make_message("News"), rcpts=("carol@example.org",)))
    await relay.idle()
    page = browse(await make_web(relay))

    # The dashboard: what came in, what was caught, and from where.
    await page.open("/")
    await page.screenshot("dashboard")
    await clean(page)
    assert await page.text("h1") == "Dashboard"
    totals = {
        event: int(await page.text(f"#total-{event} .count"))
        for event in ("received", "delivered", "duplicate", "conflict", "deferred", "failed")
    }
    assert totals == {
        "received": 3,
        "delivered": 3,
        "duplicate": 2,
        "conflict": 1,
        "deferred": 0,
        "failed": 0,
    }
    drawn = await page.script(
        "const c = Chart.getChart(document.getElementById('activity-chart'));"
        " return c.data.datasets.map(d => [d.label, d.data.reduce((a, b) => a + b, 0)]);"
    )
    assert drawn == [
        ["Received", 3],
        ["Forwarded", 3],
        ["Duplicates", 2],
        ["Conflicts", 1],
        ["Deferred", 0],
        ["Failed", 0],
    ]
    clients = await page.texts("#source-client tbody tr")
    assert clients == ["127.0.0.2 2 2"]

    # Clicking the client that repeats opens the log filtered to its duplicates.
    await page.click("#source-client tbody a", text="127.0.0.2")
    path = await page.path()
    assert path.startswith("/log?")
    assert query(path)["client"] == ["127.0.0.2"] and query(path)["event"] == ["duplicate"]
    assert await page.texts(".events tbody .qid") == [second_repeat, first_repeat]
    await clean(page)

    # Search by recipient, from the keyboard.
    await page.click("nav a", text="Log")
    await page.script("document.getElementById('f-rcpt').focus()")
    await page.press("ALICE@example.org")
    await page.press(Keys.ENTER, navigates=True)
    path = await page.path()
    assert query(path) == {"rcpt": ["ALICE@example.org"]}
    await page.screenshot("search-by-recipient")
    await clean(page)
    rows = await page.texts(".events tbody tr")
    assert len(rows) == 4
    assert all("alice@example.org" in row for row in rows)
    events = [row.split()[2] for row in rows]
    assert sorted(events) == ["delivered", "duplicate", "duplicate", "received"]
    assert events[-1] == "received"  # newest first
    assert await page.attribute("#f-rcpt", "value") == "ALICE@example.org"

    # A duplicate's page names its original ...
    await page.click(".events tbody tr.event-duplicate a.qid", text=first_repeat)
    assert await page.path() == f"/message/{first_repeat}"
    await page.screenshot("repeat")
    await clean(page)
    callout = await page.text(".repeat-of")
    assert f"repeat of {original}" in callout and "drop" in callout
    assert "not forwarded" in callout

    # ... which lists every repeat, the upstream's reply and its queue id.
    await page.click(".repeat-of a.original")
    assert await page.path() == f"/message/{original}"
    await page.screenshot("original")
    await clean(page)
    assert await page.texts(".repeats a") == [first_repeat, second_repeat]
    [recipient] = await page.texts(".recipients tbody tr")
    assert recipient.startswith("alice@example.org delivered")
    assert "queued as UP0001" in recipient and recipient.endswith("UP0001")
    timeline = await page.texts(".timeline .events tbody tr")
    events = [row.split()[2] for row in timeline]
    assert sorted(events) == ["delivered", "duplicate", "duplicate", "received"]
    assert events[0] == "received"  # oldest first
    assert sum(f"repeat of {original}" in row for row in timeline) == 2

    # And back from the original to the repeat.
    await page.click(".repeats a", text=second_repeat)
    assert await page.path() == f"/message/{second_repeat}"
    assert f"repeat of {original}" in await page.text(".repeat-of")

    # The conflict is on the invoice's page, found by its dedupe key.
    await page.open("/message/invoice-7")
    await clean(page)
    assert await page.text("h1") == f"Message {invoice_id}"
    conflicts = await page.texts(".events tbody tr.event-conflict")
    assert len(conflicts) == 1 and f"conflicts with {invoice_id}" in conflicts[0]
    assert "action=reject" in conflicts[0]


async def test_a_held_message_says_why_and_how_to_send_it_again(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb, browse: Browse
) -> None:
    relay = await make_relay(delivery={"on_ambiguous": "hold"})
    upstream.script.drop_after_data = 1
    data = make_message(to="dana@example.org")
    held = queued_id(await send(relay.port, data, rcpts=("dana@example.org",)))
    await relay.idle()
    page = browse(await make_web(relay))

    await page.open(f"/message/{held}")
    await page.screenshot("held")
    await clean(page)
    explanation = await page.text(".callout.held")
    assert "Held: delivery unknown" in explanation
    assert "may or may not have accepted it" in explanation
    assert f"python -m relay requeue {held}" in explanation
    assert "dana@example.org" in explanation
    [recipient] = await page.texts(".recipients tbody tr")
    assert recipient.startswith("dana@example.org held")
    assert "ambiguous" in await page.texts(".events tbody td:nth-child(2)")


async def test_paging_through_a_search_shows_every_event_once_while_mail_keeps_coming(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb, browse: Browse
) -> None:
    relay = await make_relay()
    for n in range(8):
        data = make_message(f"Order {n}", to="erin@example.org")
        queued_id(await send(relay.port, data, rcpts=("erin@example.org",)))
    await relay.idle()
    stored = await erins_events(relay)
    assert len(stored) == 16
    page = browse(await make_web(relay))

    await page.open("/log?rcpt=erin%40example.org&limit=6")
    seen: list[tuple[str, str]] = []

    async def rows_on_page() -> list[tuple[str, str]]:
        texts = await page.texts(".events tbody tr")
        return [(t.split()[3], t.split()[2]) for t in texts]

    seen += await rows_on_page()
    # New mail for the same recipient must not shift the pages already being read.
    for n in range(3):
        data = make_message(f"Late {n}", to="erin@example.org")
        queued_id(await send(relay.port, data, rcpts=("erin@example.org",)))
    await relay.idle()
    pages = 1
    while await page.texts(".pages a[rel=next]"):
        await page.click(".pages a[rel=next]")
        await clean(page)
        seen += await rows_on_page()
        pages += 1
    assert seen == stored
    assert pages == 3

    # Back towards the newest, page by page: now the late mail is on top.
    everything = await erins_events(relay)
    assert len(everything) == 22 and everything[6:] == stored
    back = await rows_on_page()
    while await page.texts(".pages a[rel=prev]"):
        await page.click(".pages a[rel=prev]")
        back = (await rows_on_page()) + back
    assert back == everything
    await page.click(".pages a[rel=first]")
    assert await rows_on_page() == everything[:6]
    assert await page.texts(".pages a[rel=first], .pages a[rel=prev]") == []


async def erins_events(relay: Relay) -> list[tuple[str, str]]:
    """(queue id, event) of every event for erin, newest first, as the store orders them."""
    rows = await relay.rows(
        "SELECT queue_id, event FROM events WHERE rcpts = 'erin@example.org'"
        " ORDER BY ts DESC, id DESC"
    )
    return [(str(queue_id), str(event)) for queue_id, event in rows]


async def test_the_search_works_from_the_keyboard_alone(
    make_relay: MakeRelay, upstream: Upstream, make_web: MakeWeb, browse: Browse
) -> None:
    relay = await make_relay()
    wanted = queued_id(await send(relay.port, make_message(), rcpts=("frank@example.org",)))
    queued_id(await send(relay.port, make_message(), rcpts=("gina@example.org",)))
    await relay.idle()
    page = browse(await make_web(relay))
    await page.open("/log")
    await clean(page)

    await page.press(Keys.TAB)
    focus = await page.focused()
    assert (focus["tag"], focus["text"]) == ("a", "Skip to content")
    await page.press(Keys.ENTER)
    assert (await page.focused())["id"] == "main"
    order = []
    for _ in range(13):
        await page.press(Keys.TAB)
        focus = await page.focused()
        assert focus["outline"] != "none", focus  # the focus can be seen
        order.append(focus["id"] or focus["text"])
    assert order == [
        "f-rcpt",
        "f-from",
        "f-message-id",
        "f-key",
        "f-queue-id",
        "f-client",
        "f-user",
        "f-rule",
        "f-strategy",
        "f-since",
        "f-until",
        "f-event",
        "Search",
    ]
    # Back to the recipient, type, and submit with Enter.
    await page.press(Keys.SHIFT + Keys.TAB * 12)
    assert (await page.focused())["id"] == "f-rcpt"
    await page.press("frank@example.org")
    await page.press(Keys.ENTER, navigates=True)
    assert query(await page.path()) == {"rcpt": ["frank@example.org"]}
    await clean(page)
    # From the results, the first message link is a few tabs away and opens with Enter.
    for _ in range(30):
        await page.press(Keys.TAB)
        focus = await page.focused()
        if "qid" in focus["cls"]:
            break
    assert focus["text"] == wanted
    await page.press(Keys.ENTER, navigates=True)
    assert await page.path() == f"/message/{wanted}"


async def test_login_guards_the_pages_and_never_echoes_a_password(
    make_relay: MakeRelay,
    upstream: Upstream,
    make_web: MakeWeb,
    browse: Browse,
    users_file: Path,
) -> None:
    relay = await make_relay()
    queued_id(await send(relay.port, make_message(), rcpts=("hana@example.org",)))
    await relay.idle()
    page = browse(await make_web(relay, users_file=str(users_file), login_failure_delay=0.0))

    await page.open("/log?rcpt=hana%40example.org")
    path = await page.path()
    assert path.startswith("/login?next=")
    await clean(page)
    assert await page.texts(".events") == []

    await page.script("document.getElementById('login-user').focus()")
    await page.press("ops")
    await page.press(Keys.TAB, "wrong-Secret-123")
    await page.press(Keys.ENTER, navigates=True)
    assert await page.text("#login-error") == "Wrong user name or password."
    assert "wrong-Secret-123" not in await page.source()
    assert await page.attribute("#login-password", "value") == ""
    assert await page.attribute("#login-user", "value") == "ops"
    assert await page.console_errors() == [
        f"{page.base}/login - Failed to load resource: the server responded with a status"
        " of 401 (Unauthorized)"
    ]

    await page.script("document.getElementById('login-password').focus()")
    await page.press(WEB_USERS["ops"], Keys.ENTER, navigates=True)
    path = await page.path()
    assert urlsplit(path).path == "/log" and query(path) == {"rcpt": ["hana@example.org"]}
    await clean(page)
    assert "Signed in as ops" in await page.text(".who")
    rows = await page.texts(".events tbody tr")
    assert len(rows) == 2
    source = await page.source()
    assert WEB_USERS["ops"] not in source and "$argon2id$" not in source

    await page.click(".who button")
    assert (await page.path()).startswith("/login")
    await page.open("/")
    assert (await page.path()).startswith("/login?next=/")

    # A bcrypt ($2y$, as htpasswd writes it) user logs in the same way.
    await page.script("document.getElementById('login-user').focus()")
    await page.press("support", Keys.TAB, WEB_USERS["support"], Keys.ENTER, navigates=True)
    assert await page.path() == "/"
    assert await page.text("h1") == "Dashboard"
