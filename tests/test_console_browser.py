"""The console in a real headless Chromium (Playwright over the system's browser), against
a live gunicorn of two workers on a SQLite file: one server and one browser for the module.

Each test opens its own browser context (its own cookies), signs in through the form
with the keyboard, and fails on any dialog (an injected script that ran), any error the
page logs (a CSP violation among them) and any request to another origin.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import IN_CI
from tests.servers import cli, serving
from tests.test_docs_browser import chromium_or_skip

pytestmark = pytest.mark.slow

AGENT = "support-bot"
HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(1)</script>",
    "javascript:alert(1)",
    '"><svg onload=alert(document.domain)>',
]
# Where to copy the screenshots as well (the README's are made this way).
SHOTS_ENV = "CONSOLE_SCREENSHOTS_DIR"


@pytest.fixture(scope="module")
def playwright_api() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture(scope="module")
def browser(playwright_api: Any) -> Iterator[Any]:
    executable = chromium_or_skip()
    with playwright_api() as p:
        launched = p.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("console")
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp}/console.db"}
    cli("agents", "create", AGENT, "--name", "Support", env=env)

    def key(*args: str) -> str:
        return cli("keys", "create", *args, env=env).stdout.strip().splitlines()[-1]

    scopes = "sessions:create,sessions:read,sessions:update,sessions:delete"
    tokens = {
        "admin": key("--name", "ops admin", "--admin"),
        "full": key("--name", "support team", "--grant", f"{AGENT}={scopes},events:create"),
        "read-only": key("--name", "auditor", "--grant", f"{AGENT}=sessions:read"),
        "append-only": key("--name", "runtime", "--grant", f"{AGENT}=events:append"),
    }
    with serving(env, tmp, workers=2) as server:
        yield {"url": server.url, "tokens": tokens, "tmp": tmp, "env": env}


def api(site: dict[str, Any], method: str, path: str, headers: Any = None, **kwargs: Any) -> Any:
    headers = {"x-api-key": site["tokens"]["admin"], **(headers or {})}
    return requests.request(
        method, f"{site['url']}/v2/agents/{AGENT}{path}", headers=headers, timeout=10, **kwargs
    )


def make_session(site: dict[str, Any], key: str, name: str, events: list[dict], **body: Any):
    assert api(site, "POST", "/sessions", json={"key": key, "name": name, **body}).ok
    written = api(site, "POST", f"/sessions/{key}/events/batch", json={"events": events})
    assert written.status_code == 201, written.text
    return [event["id"] for event in written.json()["events"]]


class Watched:
    """A page whose dialogs, errors and requests elsewhere are recorded."""

    def __init__(self, context: Any, base: str):
        self.page = context.new_page()
        self.base = base
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.elsewhere: list[str] = []

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", dialog)
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on(
            "request",
            lambda r: None if r.url.startswith(base) else self.elsewhere.append(r.url),
        )

    def sign_in(self, token: str) -> None:
        page = self.page
        page.goto(self.base + "/console/")
        page.get_by_label("API key").focus()
        page.keyboard.type(token)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        page.get_by_role("button", name="Sign out").wait_for()

    def clean(self) -> None:
        assert self.dialogs == [], self.dialogs
        assert self.errors == [], self.errors
        assert self.elsewhere == [], self.elsewhere


@pytest.fixture
def watched(browser: Any, site: dict[str, Any]) -> Iterator[Any]:
    contexts = []

    def open_page(width: int = 1280, **options: Any) -> Watched:
        context = browser.new_context(viewport={"width": width, "height": 900}, **options)
        context.set_default_timeout(10_000)
        contexts.append(context)
        return Watched(context, site["url"])

    yield open_page
    for context in contexts:
        context.close()


def shoot(page: Any, tmp: Path, name: str) -> Path:
    path = tmp / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get(SHOTS_ENV):
        shutil.copy(path, Path(os.environ[SHOTS_ENV]) / name)
    return path


def test_an_admin_walks_every_page_and_action(site, watched):
    ids = make_session(
        site,
        "refund",
        "Refund for order 1234",
        [
            {"type": "input_message", "messages": [{"type": "text", "content": "I want a refund"}]},
            {"type": "thinking", "content": "Look the order up first."},
            {
                "type": "tool_input",
                "tool_call_id": "call_1",
                "tool_configuration_name": "orders",
                "tool_name": "lookup_order",
                "tool_input": {"order": 1234},
            },
            {
                "type": "tool_output",
                "tool_call_id": "call_1",
                "tool_configuration_name": "orders",
                "tool_name": "lookup_order",
                "tool_output": {"status": "delivered", "total": 42.5},
            },
            {"type": "agent_output", "content": "Order 1234 was delivered; refund started."},
        ],
        description="Customer c-17 asks for a refund",
        metadata={"customer": "c-17"},
    )
    for number in range(3):
        api(
            site,
            "POST",
            "/sessions",
            json={"name": f"Billing question {number}", "tti_minutes": 60},
        )
    summary = {"type": "compact", "compact_up_to_event_id": ids[1], "summary_text": "Refund asked."}
    assert api(site, "POST", "/sessions/refund/events", json=summary).status_code == 201

    w = watched()
    page = w.page
    w.sign_in(site["tokens"]["admin"])
    page.get_by_role("link", name=AGENT).click()
    page.wait_for_url(f"**/console/agents/{AGENT}/sessions")
    rows = page.locator("table.records tbody tr")
    assert rows.count() == 4 and "Billing question 2" in rows.first.inner_text()
    shoot(page, site["tmp"], "console-sessions.png")
    page.get_by_label("Search names and descriptions").fill("(?i)REFUND")
    page.get_by_role("button", name="Search").click()
    assert page.locator("table.records tbody tr").count() == 1
    page.get_by_role("link", name="refund").click()
    page.wait_for_url("**/sessions/refund")
    page.get_by_label("Show hidden events").check()
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**include_hidden=true**")
    assert page.locator(".badge").count() == 2
    call = page.locator(f"#event-{ids[2]}")
    call.get_by_text("Input", exact=True).click()  # the tool call's input, folded
    assert call.locator("pre.json").inner_text() == '{\n  "order": 1234\n}'

    shoot(page, site["tmp"], "console-history.png")

    # Hide and unhide the newest event (the keyboard presses the focused button).
    page.get_by_role("button", name=f"Hide event {ids[4]}").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**notice=hidden**")
    assert page.get_by_role("status").inner_text() == "The event is hidden."
    page.get_by_role("button", name=f"Unhide event {ids[4]}").click()
    page.wait_for_url("**notice=unhidden**")

    # Edit with the ETag, then export.
    page.get_by_role("link", name="Edit").click()
    page.get_by_label("Name").fill("Refund, order 1234")
    page.get_by_label("Enabled (takes new events)").uncheck()
    page.get_by_role("button", name="Save").click()
    page.wait_for_url("**notice=saved**")
    assert page.get_by_role("heading", level=1).inner_text() == "Refund, order 1234"
    with page.expect_download() as download:
        page.get_by_role("link", name="Export as JSON Lines").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert json.loads(lines[0])["session"]["name"] == "Refund, order 1234"
    assert json.loads(lines[-1]) == {"end": {"events": 6}}

    # Fork from an event, compacted.
    page.get_by_role("link", name=f"Fork from event {ids[4]}").click()
    page.get_by_label("Key (made from the name when empty)").fill("refund-fork")
    page.get_by_label("Copy the events up to here hidden").check()
    page.get_by_label("Summary (needed when compacted)").fill("All of it, summed up.")
    page.get_by_role("button", name="Fork").click()
    page.wait_for_url("**/sessions/refund-fork?notice=forked")
    assert "All of it, summed up." in page.locator("ol.events").inner_text()
    page.get_by_role("link", name=f"{AGENT}/refund").click()
    page.wait_for_url("**/sessions/refund")

    # Delete an event behind its confirmation.
    page.locator(f"#event-{ids[4]} details.confirm summary").click()
    page.get_by_role("button", name=f"Delete event {ids[4]} for good").click()
    page.wait_for_url("**notice=event_deleted**")
    assert page.locator(f"#event-{ids[4]}").count() == 0

    # Keys: create (the secret once, with its copy button), then revoke it.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name", exact=True).fill("new frontend")
    page.get_by_label("Grants, one per line").fill(f"{AGENT}=sessions:read")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("Secret of new frontend").input_value()
    page.get_by_role("button", name="Copy").click()
    page.get_by_text("Copied.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    headers = {"x-api-key": secret}
    listed = requests.get(f"{site['url']}/v2/agents/{AGENT}/sessions", headers=headers, timeout=10)
    assert listed.status_code == 200
    page.get_by_role("link", name="Back to the API keys").click()
    key_id = secret.split(".")[0]
    page.locator(f'summary[aria-label="Revoke key {key_id}…"]').click()
    page.get_by_role("button", name=f"Revoke key {key_id} now").click()
    page.wait_for_url("**notice=key_revoked**")
    # Within a second on every worker (another worker may have the key cached that long).
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        listed = requests.get(
            f"{site['url']}/v2/agents/{AGENT}/sessions", headers=headers, timeout=10
        )
        if listed.status_code == 401:
            break
        time.sleep(0.1)
    assert listed.status_code == 401

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**notice=signed_out**")
    page.goto(site["url"] + f"/console/agents/{AGENT}/sessions")
    assert page.get_by_label("API key").is_visible()
    w.clean()


@pytest.mark.parametrize("width", [1280, 400])
def test_hostile_events_are_text_and_no_script_runs(site, watched, width):
    key = f"hostile-{width}"
    events = []
    for payload in HOSTILE:
        events += [
            {"type": "agent_output", "content": payload},
            {"type": "input_message", "messages": [{"type": "text", "content": payload}]},
            {
                "type": "tool_output",
                "tool_call_id": "c",
                "tool_configuration_name": payload,
                "tool_name": payload,
                "tool_output": {payload: payload},
            },
        ]
    # What the API takes of surrogates: a pair, escaped; a lone one is refused.
    pair = b'{"events": [{"type": "agent_output", "content": "pair \\ud83d\\ude00"}]}'
    make_session(site, key, HOSTILE[0], events, description=HOSTILE[1])
    assert (
        api(
            site,
            "POST",
            f"/sessions/{key}/events/batch",
            data=pair,
            headers={"Content-Type": "application/json"},
        ).status_code
        == 201
    )
    w = watched(width)
    page = w.page
    w.sign_in(site["tokens"]["read-only"])
    page.goto(f"{site['url']}/console/agents/{AGENT}/sessions/{key}?limit=100")
    page.locator("details summary").first.click()
    text = page.locator("main").inner_text()
    for payload in HOSTILE:
        assert payload in text
    assert page.locator("img").count() == 0 and page.locator("svg").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    assert page.evaluate("document.scripts.length") == 1
    page.goto(f"{site['url']}/console/agents/{AGENT}/sessions")
    assert HOSTILE[0] in page.locator("main").inner_text()
    w.clean()


def test_each_kind_of_key_sees_what_its_grants_allow(site, watched):
    ids = make_session(site, "kinds", "Kinds", [{"type": "agent_output", "content": "hello"}])
    history = f"{site['url']}/console/agents/{AGENT}/sessions/kinds"
    expected = {
        "full": {"Hide": 1, "Edit": 1, "Fork": 1, "Delete": 1, "keys": 0},
        "read-only": {"Hide": 0, "Edit": 0, "Fork": 0, "Delete": 0, "keys": 0},
    }
    for kind, counts in expected.items():
        w = watched(400)
        page = w.page
        w.sign_in(site["tokens"][kind])
        page.goto(history)
        seen = {
            "Hide": page.get_by_role("button", name=f"Hide event {ids[0]}").count(),
            "Edit": page.get_by_role("link", name="Edit").count(),
            "Fork": page.get_by_role("link", name=f"Fork from event {ids[0]}").count(),
            "Delete": page.locator(f'summary[aria-label="Delete event {ids[0]}…"]').count(),
            "keys": page.get_by_role("link", name="API keys").count(),
        }
        assert seen == counts, kind
        w.clean()
    w = watched()
    w.sign_in(site["tokens"]["append-only"])
    response = w.page.goto(history)
    assert response.status == 403
    assert "lacks sessions:read" in w.page.get_by_role("alert").inner_text()
    w.errors = [e for e in w.errors if "status of 403" not in e]  # the refusal itself
    w.clean()


def test_a_form_from_another_origin_changes_nothing(site, watched):
    ids = make_session(site, "target", "Target", [{"type": "agent_output", "content": "keep"}])
    w = watched()
    w.sign_in(site["tokens"]["full"])
    page = w.page
    action = f"{site['url']}/console/agents/{AGENT}/sessions/target/events/{ids[0]}/hide"
    other = site["url"].replace("127.0.0.1", "localhost")  # another origin, the same machine
    page.route(
        f"{other}/attack",
        lambda route: route.fulfill(
            content_type="text/html",
            body=f'<form method="post" action="{action}"><input name="csrf_token" value="x">'
            "<button>go</button></form>",
        ),
    )
    page.goto(f"{other}/attack")
    with page.expect_navigation():
        page.get_by_role("button", name="go").click()
    assert "nothing was changed" in page.content()
    listed = api(site, "GET", "/sessions/target/events").json()["events"]
    assert [event["id"] for event in listed] == ids
    w.errors = [e for e in w.errors if "status of 403" not in e]  # the refusal itself
    w.elsewhere.clear()
    w.clean()
