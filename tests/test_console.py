"""The operator console through Flask's test client: sign-in, CSRF, headers, grants,
escaping, the writes it shares with the API (a real SQLite file unless said otherwise).

The browser itself (Chromium, a live gunicorn) is tests/test_console_browser.py.
"""

from __future__ import annotations

import hashlib
import html as html_module
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import sessions_app
from sessions_app import create_app
from sessions_app.console import pages, signin
from storage_backends import ConsoleSessionNotFound
from tests.conftest import ALL_SCOPES, Keys, assert_error
from tests.servers import cli

AGENT = "support-bot"
API = f"/v2/agents/{AGENT}/sessions"
CONSOLE = f"/console/agents/{AGENT}/sessions"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PACKAGE = Path(sessions_app.__file__).parent / "console"

# The kinds of key the console is used with, and what each may do on the agent.
KINDS = {
    "admin": {"admin": True},
    "full": {"grants": [(AGENT, (*ALL_SCOPES, "events:create", "events:append"))]},
    "read-only": {"grants": [(AGENT, ("sessions:read",))]},
    "append-only": {"grants": [(AGENT, ("events:append",))]},
}


class Browser:
    """A test client used as a browser: cookies kept, forms read off the pages."""

    def __init__(self, app: Flask, base_url: str = "http://localhost"):
        self.client = app.test_client()
        self.base_url = base_url

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, base_url=self.base_url, **kwargs)

    def sign_in(self, token: str, **extra: str) -> Any:
        page = self.get("/console/")
        login_token = field(page.get_data(as_text=True), "login_token")
        return self.client.post(
            "/console/login",
            data={"api_key": token, "login_token": login_token, **extra},
            base_url=self.base_url,
        )

    def csrf(self) -> str:
        return field(self.client.get("/console/").get_data(as_text=True), "csrf_token")

    def post(self, path: str, data: dict[str, Any] | None = None, csrf: bool = True, **kw: Any):
        data = dict(data or {})
        if csrf:
            data.setdefault("csrf_token", self.csrf())
        return self.client.post(path, data=data, **kw)

    def cookie(self) -> str | None:
        found = self.client.get_cookie(signin.COOKIE, path="/console")
        return None if found is None else found.value


def field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} field"
    return html_module.unescape(found.group(1))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app({"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/sessions.db"})
    yield app
    app.extensions["agent_sessions"].storage.close()


@pytest.fixture
def setup(app: Flask) -> dict[str, Any]:
    """The agent, a session ``chat`` with four events, and a key of each kind."""
    keys = Keys(app)
    tokens = {}
    for kind, spec in KINDS.items():
        tokens[kind] = keys.create(*spec.get("grants", ()), admin=spec.get("admin", False))[1]
    api = app.test_client()
    admin = {"x-api-key": tokens["admin"]}
    assert api.post("/v2/agents", json={"key": AGENT, "name": "Support"}, headers=admin)
    created = api.post(API, json={"key": "chat", "name": "Chat"}, headers=admin)
    assert created.status_code == 201
    events = [
        {"type": "agent_output", "content": "one"},
        {"type": "thinking", "content": "two"},
        {"type": "agent_output", "content": "three"},
        {"type": "agent_output", "content": "four"},
    ]
    written = api.post(f"{API}/chat/events/batch", json={"events": events}, headers=admin)
    assert written.status_code == 201
    ids = [event["id"] for event in written.get_json()["events"]]
    return {"api": api, "admin": admin, "tokens": tokens, "ids": ids, "keys": keys}


def signed_in(app: Flask, token: str, **kwargs: Any) -> Browser:
    browser = Browser(app, **kwargs)
    response = browser.sign_in(token)
    assert response.status_code == 303, response.get_data(as_text=True)
    return browser


def visible_ids(setup: dict[str, Any], session: str = "chat") -> list[str]:
    answer = setup["api"].get(f"{API}/{session}/events?limit=100", headers=setup["admin"])
    return [event["id"] for event in answer.get_json()["events"]]


# Headers


def assert_console_headers(response: Any, label: str) -> None:
    headers = response.headers
    assert headers.get("Content-Security-Policy") == CSP, label
    assert headers.get("X-Frame-Options") == "DENY", label
    assert headers.getlist("X-Content-Type-Options") == ["nosniff"], label
    assert headers.get("Cache-Control") == "no-store", label
    assert headers.get("Referrer-Policy") == "no-referrer", label


def test_every_console_answer_carries_the_security_headers(app, setup):
    browser = Browser(app)
    answers = [("sign-in", browser.get("/console/"))]
    answers.append(("static", browser.get("/console/static/console.css")))
    answers.append(("signed out", browser.get(f"{CONSOLE}/chat")))
    browser.sign_in(setup["tokens"]["read-only"])
    for path in ("/console/", CONSOLE, f"{CONSOLE}/chat", f"{CONSOLE}/nope", "/console/x/y"):
        answers.append((path, browser.get(path)))
    answers.append(("403", browser.get("/console/keys")))
    answers.append(("403 post", browser.post(f"{CONSOLE}/chat/delete")))
    answers.append(("js", browser.get("/console/static/console.js")))
    statuses = {label: response.status_code for label, response in answers}
    assert statuses[f"{CONSOLE}/nope"] == 404 and statuses["403"] == 403, statuses
    for label, response in answers:
        assert_console_headers(response, label)
        assert "Traceback" not in response.get_data(as_text=True)
        response.close()  # the static files' answers hold their file open


@pytest.mark.parametrize("signed_in_as", [None, "full"])
def test_answers_made_before_any_console_view_carry_the_headers(app, setup, signed_in_as):
    """A redirect of routing (``/console`` to ``/console/``) and a method no console URL
    takes are answered before the blueprint knows the request: they get the headers too."""
    browser = Browser(app)
    if signed_in_as:
        browser.sign_in(setup["tokens"][signed_in_as])
    event = f"{CONSOLE}/chat/events/{setup['ids'][0]}/hide"
    answers = [("no slash", browser.get("/console"))]
    for method in ("PUT", "DELETE", "PATCH"):
        answers.append((method, browser.client.open(event, method=method)))
    statuses = {label: response.status_code for label, response in answers}
    assert statuses == {"no slash": 308, "PUT": 405, "DELETE": 405, "PATCH": 405}, statuses
    for label, response in answers:
        assert_console_headers(response, label)
    assert visible_ids(setup) == setup["ids"]


def test_the_api_gets_none_of_the_console_headers(app, setup):
    response = setup["api"].get(f"{API}/chat", headers=setup["admin"])
    assert response.status_code == 200
    assert "Content-Security-Policy" not in response.headers
    assert "X-Frame-Options" not in response.headers


def test_a_host_application_gets_the_headers_once_too(tmp_path):
    host = Flask("host")
    host.config.update(TESTING=True, STORAGE_URL=f"sqlite:///{tmp_path}/host.db")
    sessions_app.init_app(host)
    try:
        response = host.test_client().get("/console/")
        assert response.status_code == 200
        assert_console_headers(response, "host")
    finally:
        host.extensions["agent_sessions"].storage.close()


def test_the_console_is_off_when_disabled(tmp_path):
    app = create_app({"STORAGE_URL": f"sqlite:///{tmp_path}/s.db", "CONSOLE_ENABLED": "false"})
    try:
        client = app.test_client()
        assert_error(client.get("/console/"), 404, "not_found")
        assert_error(client.get("/console/static/console.css"), 404, "not_found")
    finally:
        app.extensions["agent_sessions"].storage.close()


# Signing in and out


def test_the_sign_in_form_posts_api_key_to_login(app):
    html = Browser(app).get("/console/").get_data(as_text=True)
    assert 'action="/console/login"' in html and 'name="api_key"' in html
    assert '<label for="api_key">' in html


def test_signing_in_stores_a_hash_and_sets_a_strict_cookie(app, setup):
    token = setup["tokens"]["full"]
    browser = Browser(app)
    response = browser.sign_in(token)
    assert response.status_code == 303 and response.headers["Location"] == "/console/"
    cookies = response.headers.getlist("Set-Cookie")
    session_cookie = next(c for c in cookies if c.startswith(signin.COOKIE + "="))
    assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie
    assert "Path=/console" in session_cookie and "Secure" not in session_cookie
    assert all(token not in c for c in cookies)  # the key never goes to the browser
    value = browser.cookie()
    store = app.extensions["agent_sessions"].storage
    stored = store.get_console_session(
        token_hash=hashlib.sha256(value.encode()).hexdigest(), now=_now()
    )
    assert stored.key_id == token.split(".")[0] and stored.csrf_token
    dump = "\n".join(
        " ".join(map(str, row)) for row in store.db.execute("SELECT * FROM console_sessions")
    )
    assert value not in dump and token.split(".")[1] not in dump
    assert stored.csrf_token in browser.get("/console/").get_data(as_text=True)


def _now() -> Any:
    from storage_backends.codec import utcnow

    return utcnow()


def test_the_cookie_is_secure_behind_https(app, setup):
    response = Browser(app, base_url="https://localhost").sign_in(setup["tokens"]["full"])
    session_cookie = next(
        c for c in response.headers.getlist("Set-Cookie") if c.startswith(signin.COOKIE + "=")
    )
    assert "Secure" in session_cookie


def test_a_planted_cookie_is_never_the_sign_in(app, setup):
    browser = Browser(app)
    browser.client.set_cookie(signin.COOKIE, "chosen-by-someone-else", path="/console")
    login_token = field(browser.get("/console/").get_data(as_text=True), "login_token")
    browser.sign_in(setup["tokens"]["full"])
    assert browser.cookie() not in ("chosen-by-someone-else", login_token, None)


def test_each_sign_in_gets_a_new_token_and_the_old_one_ends(app, setup):
    browser = signed_in(app, setup["tokens"]["full"])
    first = browser.cookie()
    # Signed in, the page has no sign-in form: post one as a second tab would have.
    browser.client.set_cookie(signin.LOGIN_COOKIE, "t" * 43, path="/console")
    data = {"api_key": setup["tokens"]["read-only"], "login_token": "t" * 43}
    assert browser.client.post("/console/login", data=data).status_code == 303
    second = browser.cookie()
    assert first and second and first != second
    replay = Browser(app)
    replay.client.set_cookie(signin.COOKIE, first, path="/console")
    response = replay.get(f"{CONSOLE}/chat")
    assert response.status_code == 303 and response.headers["Location"].startswith("/console/?")


def test_a_wrong_key_is_refused_in_the_page(app, setup):
    wrong = setup["tokens"]["full"][:-2] + "xx"
    for token in ("", "nonsense", wrong, "ak_unknown.secret"):
        response = Browser(app).sign_in(token)
        assert response.status_code == 401
        assert "That API key is not valid" in response.get_data(as_text=True)
        assert not any(
            c.startswith(signin.COOKIE + "=") and "Max-Age=0" not in c
            for c in response.headers.getlist("Set-Cookie")
        )


def test_sign_in_failures_count_against_the_api_limit(tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "STORAGE_URL": f"sqlite:///{tmp_path}/s.db",
            "AUTH_FAILURE_LIMIT": "3/minute",
        }
    )
    try:
        _, token = Keys(app).create(admin=True)
        browser = Browser(app)
        statuses = [browser.sign_in("ak_nope.wrong").status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        # One limit for the address: the API refuses it too, even with a right key...
        assert_error(
            app.test_client().get("/v2/agents", headers={"x-api-key": token}),
            429,
            "rate_limit_exceeded",
        )
        # ... and so does the console, before looking at the key.
        response = browser.sign_in(token)
        assert response.status_code == 429 and "Retry-After" in response.headers
        assert browser.cookie() is None
    finally:
        app.extensions["agent_sessions"].storage.close()


def test_a_sign_in_form_from_elsewhere_is_refused(app, setup):
    client = app.test_client()
    response = client.post("/console/login", data={"api_key": setup["tokens"]["admin"]})
    assert response.status_code == 403
    assert client.get_cookie(signin.COOKIE, path="/console") is None


def test_signing_out_ends_the_sign_in(app, setup):
    browser = signed_in(app, setup["tokens"]["full"])
    value = browser.cookie()
    response = browser.post("/console/logout")
    assert response.status_code == 303 and "notice=signed_out" in response.headers["Location"]
    assert browser.cookie() is None
    store = app.extensions["agent_sessions"].storage
    with pytest.raises(ConsoleSessionNotFound):
        store.get_console_session(token_hash=signin.hash_token(value), now=_now())
    replay = Browser(app)
    replay.client.set_cookie(signin.COOKIE, value, path="/console")
    assert replay.get(CONSOLE).status_code == 303


def test_a_revoked_key_ends_its_console_session_at_the_next_request(app, setup):
    browser = signed_in(app, setup["tokens"]["full"])
    assert browser.get(CONSOLE).status_code == 200
    key_id = setup["tokens"]["full"].split(".")[0]
    assert setup["api"].delete(f"/v2/api_keys/{key_id}", headers=setup["admin"]).status_code == 204
    response = browser.get(CONSOLE)
    assert response.status_code == 303
    assert "notice=ended" in response.headers["Location"]
    assert browser.cookie() is None
    page = browser.get(response.headers["Location"]).get_data(as_text=True)
    assert "revoked or has expired" in page and 'name="api_key"' in page


def test_an_expired_sign_in_goes_back_to_sign_in(app, setup, monkeypatch):
    import datetime as dt

    browser = signed_in(app, setup["tokens"]["full"])
    later = _now() + dt.timedelta(minutes=app.config["CONSOLE_SESSION_MINUTES"] + 1)
    monkeypatch.setattr(signin, "utcnow", lambda: later)
    response = browser.get(f"{CONSOLE}/chat")
    assert response.status_code == 303 and "notice=expired" in response.headers["Location"]


PAGES = [
    "/console/keys",
    CONSOLE,
    f"{CONSOLE}/chat",
    f"{CONSOLE}/chat?order=asc",
    f"{CONSOLE}/chat/edit",
    f"{CONSOLE}/chat/fork",
    f"{CONSOLE}/chat/export.jsonl",
    "/console/agents/open?agent_key=x",
]


@pytest.mark.parametrize("path", PAGES)
def test_signed_out_pages_go_to_sign_in(app, setup, path):
    response = Browser(app).get(path)
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location.startswith("/console/?next=")
    page = Browser(app).get(location).get_data(as_text=True)
    assert 'name="api_key"' in page


def test_signed_out_posts_change_nothing(app, setup):
    ids = setup["ids"]
    browser = Browser(app)
    posts = [
        f"{CONSOLE}/chat/events/{ids[0]}/hide",
        f"{CONSOLE}/chat/events/{ids[1]}/delete",
        f"{CONSOLE}/chat/delete",
        f"{CONSOLE}/chat/edit",
        "/console/keys",
        "/console/logout",
    ]
    for path in posts:
        response = browser.post(path, {"csrf_token": "x", "name": "changed"}, csrf=False)
        assert response.status_code == 303 and response.headers["Location"].startswith("/console/")
    assert visible_ids(setup) == ids
    answer = setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()
    assert answer["name"] == "Chat"


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "https://evil.example/console/",
        "/console//evil",
        "/elsewhere",
        "/console/\\evil",
        "javascript:alert(1)",
        "/console/../v2/agents",
        "/console/agents/../../v2/agents",
        "/console/%2e%2e/v2/agents",
        "/console/.%2E/v2/agents",
        "/console/./",
    ],
)
def test_after_sign_in_only_console_paths_are_followed(app, setup, target):
    response = Browser(app).sign_in(setup["tokens"]["full"], next=target)
    assert response.headers["Location"] == "/console/"


def test_after_sign_in_the_page_asked_for_opens(app, setup):
    first = Browser(app)
    location = first.get(f"{CONSOLE}/chat?order=asc").headers["Location"]
    next_path = field(first.get(location).get_data(as_text=True), "next")
    assert next_path == f"{CONSOLE}/chat?order=asc"
    response = first.sign_in(setup["tokens"]["full"], next=next_path)
    assert response.headers["Location"] == next_path


# CSRF


def test_a_post_without_its_csrf_token_changes_nothing(app, setup):
    ids = setup["ids"]
    browser = signed_in(app, setup["tokens"]["full"])
    other = signed_in(app, setup["tokens"]["full"])
    hide = f"{CONSOLE}/chat/events/{ids[0]}/hide"
    for data in ({}, {"csrf_token": ""}, {"csrf_token": other.csrf()}, {"csrf_token": "x" * 43}):
        response = browser.post(hide, data, csrf=False)
        assert response.status_code == 403, data
        assert "nothing was changed" in response.get_data(as_text=True)
    response = browser.post(f"{CONSOLE}/chat/delete", {"csrf_token": other.csrf()}, csrf=False)
    assert response.status_code == 403
    response = browser.post("/console/logout", {}, csrf=False)
    assert response.status_code == 403 and browser.cookie()
    assert visible_ids(setup) == ids
    assert browser.post(hide).status_code == 303
    assert visible_ids(setup) == ids[1:]


def test_a_post_from_another_site_is_refused(app, setup):
    ids = setup["ids"]
    browser = signed_in(app, setup["tokens"]["full"])
    response = browser.post(
        f"{CONSOLE}/chat/events/{ids[0]}/hide", headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert response.status_code == 403
    assert visible_ids(setup) == ids


def test_a_get_changes_nothing(app, setup):
    ids = setup["ids"]
    browser = signed_in(app, setup["tokens"]["admin"])
    for path in (
        f"{CONSOLE}/chat/events/{ids[0]}/hide",
        f"{CONSOLE}/chat/delete",
        "/console/logout",
    ):
        browser.get(path)
    assert visible_ids(setup) == ids and browser.get(CONSOLE).status_code == 200


# Grants: every page and button as the API decides, and the POST refused anyway

# What each kind of key sees on a session's page, and may do there.
BUTTONS = {
    "Edit": "sessions:update",
    "Hide event": "sessions:update",
    "Fork from event": "sessions:create",
    "Delete event": "sessions:delete",
    "Delete session": "sessions:delete",
}


def allowed(kind: str, scope: str) -> bool:
    spec = KINDS[kind]
    return spec.get("admin", False) or any(scope in scopes for _, scopes in spec["grants"])


@pytest.mark.parametrize("kind", KINDS)
def test_the_key_decides_every_page_and_button(app, setup, kind):
    browser = signed_in(app, setup["tokens"][kind])
    history = browser.get(f"{CONSOLE}/chat")
    if not allowed(kind, "sessions:read"):
        assert history.status_code == 403
        assert "lacks sessions:read" in history.get_data(as_text=True)
        assert browser.get(CONSOLE).status_code == 403
        assert browser.get(f"{CONSOLE}/chat/export.jsonl").status_code == 403
        return
    html = history.get_data(as_text=True)
    assert history.status_code == 200 and "four" in html
    shown = {
        "Edit": f'href="{CONSOLE}/chat/edit"' in html,
        "Hide event": 'aria-label="Hide event ' in html,
        "Fork from event": 'aria-label="Fork from event ' in html,
        "Delete event": 'aria-label="Delete event ' in html,
        "Delete session": f'action="{CONSOLE}/chat/delete"' in html,
    }
    assert shown == {label: allowed(kind, scope) for label, scope in BUTTONS.items()}
    keys_page = browser.get("/console/keys")
    assert keys_page.status_code == (200 if kind == "admin" else 403)
    assert ('href="/console/keys"' in html) == (kind == "admin")


@pytest.mark.parametrize("kind", ["read-only", "append-only"])
def test_a_post_the_key_may_not_make_is_refused_and_changes_nothing(app, setup, kind):
    ids = setup["ids"]
    browser = signed_in(app, setup["tokens"][kind])
    etag = setup["api"].get(f"{API}/chat", headers=setup["admin"]).headers["ETag"]
    posts = [
        (f"{CONSOLE}/chat/events/{ids[0]}/hide", {}),
        (f"{CONSOLE}/chat/events/{ids[1]}/delete", {}),
        (f"{CONSOLE}/chat/delete", {}),
        (f"{CONSOLE}/chat/edit", {"name": "changed", "etag": etag, "metadata": "{}"}),
        (f"{CONSOLE}/chat/fork", {"name": "fork", "key": "fork"}),
        ("/console/keys", {"name": "mine", "admin": "on"}),
    ]
    for path, data in posts:
        response = browser.post(path, data)
        assert response.status_code == 403, path
        assert "Not allowed" in response.get_data(as_text=True)
    assert visible_ids(setup) == ids
    session = setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()
    assert session["name"] == "Chat"
    assert setup["api"].get(f"{API}/fork", headers=setup["admin"]).status_code == 404
    listed = setup["api"].get("/v2/api_keys?limit=100", headers=setup["admin"]).get_json()
    assert "mine" not in [k["name"] for k in listed["api_keys"]]


def test_a_key_granted_elsewhere_sees_nothing_of_this_agent(app, setup):
    _, token = setup["keys"].create(("other-agent", ALL_SCOPES))
    browser = signed_in(app, token)
    for path in (CONSOLE, f"{CONSOLE}/chat", f"{CONSOLE}/nope", "/console/agents/nope/sessions"):
        assert browser.get(path).status_code == 403, path
    agents = browser.get("/console/").get_data(as_text=True)
    assert "other-agent" in agents and AGENT not in agents


def test_full_key_hides_unhides_and_deletes_events(app, setup):
    ids = setup["ids"]
    browser = signed_in(app, setup["tokens"]["full"])
    back = f"{CONSOLE}/chat?order=asc"
    response = browser.post(f"{CONSOLE}/chat/events/{ids[0]}/hide", {"back": back})
    assert response.status_code == 303
    assert response.headers["Location"] == f"{back}&notice=hidden"
    assert visible_ids(setup) == ids[1:]
    page = browser.get(f"{CONSOLE}/chat?include_hidden=true").get_data(as_text=True)
    assert 'data-reason="manual"' in page and "Hidden: hidden by hand" in page
    assert ids[0] not in browser.get(f"{CONSOLE}/chat").get_data(as_text=True)
    assert browser.post(f"{CONSOLE}/chat/events/{ids[0]}/unhide").status_code == 303
    assert visible_ids(setup) == ids
    response = browser.post(f"{CONSOLE}/chat/events/{ids[1]}/delete", {"back": "//evil/"})
    assert response.headers["Location"] == f"{CONSOLE}/chat?notice=event_deleted"
    assert visible_ids(setup) == [ids[0], *ids[2:]]
    missing = browser.post(f"{CONSOLE}/chat/events/{ids[1]}/delete")
    assert missing.status_code == 404 and "has no event" in missing.get_data(as_text=True)
    assert browser.post(f"{CONSOLE}/chat/delete").status_code == 303
    assert setup["api"].get(f"{API}/chat", headers=setup["admin"]).status_code == 404


# Event content is the attacker's: shown as text, never as markup


PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(1)</script>",
    "javascript:alert(1)",
    '"><svg onload=alert(1)>',
    "{{ 7 * 7 }}",
]


def test_hostile_content_is_drawn_as_text(app, setup):
    api, admin = setup["api"], setup["admin"]
    created = api.post(
        API,
        json={
            "key": "evil",
            "name": PAYLOADS[0],
            "description": PAYLOADS[1],
            "metadata": {PAYLOADS[3]: PAYLOADS[2]},
        },
        headers=admin,
    )
    assert created.status_code == 201
    events = []
    for payload in PAYLOADS:
        events += [
            {"type": "agent_output", "content": payload},
            {"type": "input_message", "messages": [{"type": "text", "content": payload}]},
            {
                "type": "tool_input",
                "tool_call_id": "c",
                "tool_configuration_name": payload,
                "tool_name": payload,
                "tool_input": {payload: [payload]},
            },
            {"type": "structured_output", "schema_name": payload, "content": payload},
            {
                "type": "tool_output",
                "tool_call_id": "c",
                "tool_configuration_name": "t",
                "tool_name": "t",
                "tool_output": {"link": payload},
                "error": True,
            },
            {"type": "step_transition", "from_step": payload, "to_step": "b", "content": payload},
        ]
    written = api.post(f"{API}/evil/events/batch", json={"events": events}, headers=admin)
    assert written.status_code == 201, written.get_json()
    browser = signed_in(app, setup["tokens"]["full"])
    pages = [
        browser.get(f"{CONSOLE}/evil?limit=100"),
        browser.get(CONSOLE),
        browser.get(f"{CONSOLE}/evil/edit"),
        browser.get(f"{CONSOLE}/evil/fork"),
    ]
    for response in pages:
        html = response.get_data(as_text=True)
        assert response.status_code == 200
        assert "<img src=x" not in html and "<svg" not in html
        assert "<script>alert" not in html and "</script><script>" not in html
        assert 'href="javascript:' not in html.lower() and "onerror=alert(1)>" not in html
        assert "{{ 7 * 7 }}" in html or response is not pages[0]
    history = pages[0].get_data(as_text=True)
    assert "&lt;img src=x onerror=alert(1)&gt;" in history
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in history
    assert "javascript:alert(1)" in history
    # Every script the page has is the console's own file.
    assert re.findall(r"<script[^>]*>", history) == [
        '<script src="/console/static/console.js" defer>'
    ]


def test_surrogates_the_api_takes_are_drawn_and_a_lone_one_is_refused(app, setup):
    api, admin = setup["api"], setup["admin"]
    json_type = {"Content-Type": "application/json"} | admin
    lone = b'{"events": [{"type": "agent_output", "content": "bad \\ud800 half"}]}'
    refused = api.post(f"{API}/chat/events/batch", data=lone, headers=json_type)
    assert_error(refused, 400, "invalid_request")
    paired = b'{"events": [{"type": "agent_output", "content": "pair \\ud83d\\ude00 ok"}]}'
    assert api.post(f"{API}/chat/events/batch", data=paired, headers=json_type).status_code == 201
    html = signed_in(app, setup["tokens"]["full"]).get(f"{CONSOLE}/chat").get_data(as_text=True)
    assert "pair \U0001f600 ok" in html


def test_a_lone_surrogate_in_a_store_is_shown_escaped_not_a_500():
    from storage_backends import Event
    from storage_backends.codec import utcnow

    app = create_app({"TESTING": True, "STORAGE_URL": "memory://"})
    keys = Keys(app)
    _, token = keys.create(admin=True)
    api = app.test_client()
    api.post("/v2/agents", json={"key": AGENT, "name": "S"}, headers={"x-api-key": token})
    api.post(API, json={"key": "chat", "name": "Chat"}, headers={"x-api-key": token})
    app.extensions["agent_sessions"].storage.append_events(
        agent_key=AGENT,
        session_key="chat",
        events=[Event("aev_lone1", "chat", "agent_output", {"content": "a\ud800b"}, utcnow())],
        now=utcnow(),
    )
    browser = signed_in(app, token)
    response = browser.get(f"{CONSOLE}/chat")
    assert response.status_code == 200
    assert "a\\ud800b" in response.get_data(as_text=True)
    exported = browser.get(f"{CONSOLE}/chat/export.jsonl")
    assert exported.status_code == 200 and b'"a\\ud800b"' in exported.data


# Edits through the API's schema, with its ETag


def edit_form(browser: Browser, **changes: str) -> dict[str, str]:
    html = browser.get(f"{CONSOLE}/chat/edit").get_data(as_text=True)
    form = {
        "etag": field(html, "etag"),
        "name": field(html, "name"),
        "description": "",
        "metadata": "{}",
        "tti_minutes": field(html, "tti_minutes"),
        "enabled": "on",
    }
    form.update(changes)
    return form


def test_an_edit_is_saved_with_the_api_etag(app, setup):
    browser = signed_in(app, setup["tokens"]["full"])
    form = edit_form(browser)
    assert form["etag"] == setup["api"].get(f"{API}/chat", headers=setup["admin"]).headers["ETag"]
    history = browser.get(f"{CONSOLE}/chat").get_data(as_text=True)
    assert form["etag"].replace('"', "&#34;") in history
    form.update(name="Renamed", description="Now\nwith lines", metadata='{"a": [1, 2]}')
    form.pop("enabled")  # unchecked
    response = browser.post(f"{CONSOLE}/chat/edit", form)
    assert response.status_code == 303 and response.headers["Location"].endswith("notice=saved")
    stored = setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()
    assert (stored["name"], stored["description"]) == ("Renamed", "Now\nwith lines")
    assert stored["metadata"] == {"a": [1, 2]} and stored["enabled"] is False
    cleared = browser.post(f"{CONSOLE}/chat/edit", edit_form(browser, description=""))
    assert cleared.status_code == 303
    assert "description" not in setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()


def test_a_concurrent_edit_is_a_clear_message_not_a_lost_update(app, setup):
    browser = signed_in(app, setup["tokens"]["full"])
    form = edit_form(browser, name="Mine")
    patched = setup["api"].patch(f"{API}/chat", json={"name": "Theirs"}, headers=setup["admin"])
    assert patched.status_code == 200
    response = browser.post(f"{CONSOLE}/chat/edit", form)
    html = response.get_data(as_text=True)
    assert response.status_code == 412 and "Someone changed this session" in html
    assert "Theirs" in html and 'value="Mine"' in html
    assert setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()["name"] == "Theirs"
    again = browser.post(f"{CONSOLE}/chat/edit", {**form, "etag": field(html, "etag")})
    assert again.status_code == 303
    assert setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()["name"] == "Mine"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"name": "x" * 256}, "name: Length must be between 1 and 255."),
        ({"name": "   "}, "name: Must not be blank."),
        ({"name": "a\x1bb"}, "name: Must not contain control characters."),
        ({"metadata": "{not json"}, "metadata: Not valid JSON"),
        ({"metadata": "[1]"}, "metadata: Must be a JSON object."),
        ({"metadata": '{"a": 1, "a": 2}'}, "metadata: Not valid JSON"),
        ({"metadata": '{"' + "k" * 129 + '": 1}'}, "metadata: Keys must be 1 to 128"),
        ({"tti_minutes": "-1"}, "tti_minutes: A whole number"),
        ({"tti_minutes": str(2**31)}, "tti_minutes: Must be greater than or equal to 0"),
        ({"etag": "not a tag"}, "If-Match: not"),
    ],
)
def test_an_edit_the_api_would_refuse_is_refused_in_words(app, setup, changes, words):
    browser = signed_in(app, setup["tokens"]["full"])
    before = setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json()
    response = browser.post(f"{CONSOLE}/chat/edit", edit_form(browser, **changes))
    html = response.get_data(as_text=True)
    assert response.status_code == 400
    assert words.replace("'", "&#39;") in html, html[-1500:]
    assert setup["api"].get(f"{API}/chat", headers=setup["admin"]).get_json() == before


# Export, fork, lists


def test_the_export_is_the_cli_export(app, setup, tmp_path):
    setup["api"].post(f"{API}/chat/events/{setup['ids'][1]}/hide", headers=setup["admin"])
    browser = signed_in(app, setup["tokens"]["read-only"])
    response = browser.get(f"{CONSOLE}/chat/export.jsonl")
    assert response.status_code == 200 and response.is_streamed
    assert response.headers["Content-Disposition"] == (f'attachment; filename="{AGENT}-chat.jsonl"')
    env = {"AGENT_SESSIONS_STORAGE_URL": app.config["STORAGE_URL"]}
    exported = cli("sessions", "export", AGENT, "chat", env=env).stdout
    assert response.get_data(as_text=True) == exported
    assert '"hide_reason": "manual"' in exported and exported.count("\n") == 6


def test_forks_from_an_event_plain_and_compacted(app, setup):
    ids = setup["ids"]
    browser = signed_in(app, setup["tokens"]["full"])
    form = browser.get(f"{CONSOLE}/chat/fork?event_id={ids[2]}").get_data(as_text=True)
    assert field(form, "event_id") == ids[2] and 'value="Chat (fork)"' in form
    response = browser.post(f"{CONSOLE}/chat/fork", {"event_id": ids[2], "name": "Fork A"})
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location.startswith(f"{CONSOLE}/fork-a") and "notice=forked" in location
    forked = setup["api"].get(f"{API}/fork-a", headers=setup["admin"]).get_json()
    assert forked["forked_from"] == {"agent_key": AGENT, "session_key": "chat", "event_id": ids[2]}
    assert visible_ids(setup, "fork-a") == ids[:3]
    page = browser.get(f"{CONSOLE}/fork-a").get_data(as_text=True)
    assert f'href="{CONSOLE}/chat"' in page  # the link to the source
    compacted = {
        "event_id": ids[1],
        "name": "B",
        "key": "fork-b",
        "compact": "on",
        "summary_text": "Two events, summed up.",
    }
    assert browser.post(f"{CONSOLE}/chat/fork", compacted).status_code == 303
    events = setup["api"].get(f"{API}/fork-b/events?include_hidden=true", headers=setup["admin"])
    kinds = [(e["type"], e.get("hide_reason")) for e in events.get_json()["events"]]
    assert kinds == [
        ("agent_output", "compaction"),
        ("thinking", "compaction"),
        ("agent_output", None),
        ("agent_output", None),
        ("compaction", None),
    ]
    history = browser.get(f"{CONSOLE}/fork-b?include_hidden=true").get_data(as_text=True)
    assert "Two events, summed up." in history and "0 turns and 2 events compacted" in history
    for data, words in [
        (
            {**compacted, "key": "fork-c", "summary_text": ""},
            "Required with compact_up_to_event_id",
        ),
        ({"event_id": ids[1], "name": "B", "key": "fork-b"}, "Key fork-b already exists"),
        ({"event_id": ids[1], "name": "", "key": "x"}, "name: Must not be blank."),
        ({"event_id": ids[1], "name": "B", "key": "bad key"}, "key: Must be 1 to 64"),
    ]:
        response = browser.post(f"{CONSOLE}/chat/fork", data)
        assert response.status_code in (400, 409)
        assert words in response.get_data(as_text=True), words
    gone = browser.post(f"{CONSOLE}/chat/fork", {"event_id": "aev_nope", "name": "C"})
    assert gone.status_code == 404


def test_sessions_list_newest_first_in_pages_with_the_api_filter(app, setup):
    api, admin = setup["api"], setup["admin"]
    for number in range(30):
        name = f"Billing {number}" if number % 3 == 0 else f"Other {number}"
        api.post(API, json={"key": f"s{number:02}", "name": name}, headers=admin)
    browser = signed_in(app, setup["tokens"]["read-only"])
    first = browser.get(CONSOLE).get_data(as_text=True)
    listed = re.findall(rf'href="{CONSOLE}/(s\d\d|chat)"', first)
    assert listed == [f"s{n:02}" for n in range(29, 4, -1)]
    next_page = re.search(r'href="([^"]+)" rel="next"', first).group(1).replace("&amp;", "&")
    rest = re.findall(
        rf'href="{CONSOLE}/(s\d\d|chat)"', browser.get(next_page).get_data(as_text=True)
    )
    assert rest == ["s04", "s03", "s02", "s01", "s00", "chat"]
    found = browser.get(CONSOLE, query_string={"filter": "(?i)BILLING"}).get_data(as_text=True)
    assert re.findall(rf'href="{CONSOLE}/(s\d\d)"', found) == [
        f"s{n:02}" for n in range(27, -1, -3)
    ]
    for query, words in [
        ({"filter": "("}, "filter: "),
        ({"filter": "x" * 257}, "filter: "),
        ({"filter": r"(a)\1"}, "filter: "),
        ({"limit": "0"}, "limit: "),
        ({"page_key": "bogus"}, "page_key: Not a page key"),
        ({"filtr": "x"}, "filtr: Unknown field."),
    ]:
        response = browser.get(CONSOLE, query_string=query)
        assert response.status_code == 400, query
        assert words in response.get_data(as_text=True), query
    assert browser.get("/console/agents/nobody/sessions").status_code == 403
    admin_browser = signed_in(app, setup["tokens"]["admin"])
    assert admin_browser.get("/console/agents/nobody/sessions").status_code == 404


def test_history_pages_both_ways_with_the_api_page_keys(app, setup):
    api, admin = setup["api"], setup["admin"]
    events = [{"type": "agent_output", "content": f"event {n}"} for n in range(100)]
    api.post(f"{API}/chat/events/batch", json={"events": events}, headers=admin)
    browser = signed_in(app, setup["tokens"]["read-only"])
    newest = browser.get(f"{CONSOLE}/chat").get_data(as_text=True)
    shown = re.findall(r'<div class="text content">event (\d+)</div>', newest)
    assert shown == [str(n) for n in range(99, 49, -1)]
    api_page = api.get(f"{API}/chat/events?order=desc&limit=50", headers=admin).get_json()
    page_key = api_page["metadata"]["page_key"]
    second = browser.get(f"{CONSOLE}/chat", query_string={"order": "desc", "page_key": page_key})
    shown = re.findall(
        r'<div class="text content">event (\d+)</div>', second.get_data(as_text=True)
    )
    assert shown == [str(n) for n in range(49, -1, -1)]
    oldest = browser.get(f"{CONSOLE}/chat?order=asc&limit=3&type=thinking,agent_output")
    assert re.findall(
        r'<div class="text content">([a-z]+)</div>', oldest.get_data(as_text=True)
    ) == ["one", "two", "three"]
    wrong_way = browser.get(f"{CONSOLE}/chat", query_string={"order": "asc", "page_key": page_key})
    assert wrong_way.status_code == 400


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_a_history_page_ends_once_its_events_hold_a_million_characters(app, setup, order):
    """Eight events of 200,000 characters: a page of five (2**20 at most), then three,
    none lost or repeated; escaped, 50 such events would be tens of megabytes of HTML."""
    api, admin = setup["api"], setup["admin"]
    assert api.post(API, json={"key": "big", "name": "Big"}, headers=admin).status_code == 201
    events = [{"type": "agent_output", "content": f"{n}:" + "<" * 200_000} for n in range(8)]
    written = api.post(f"{API}/big/events/batch", json={"events": events}, headers=admin)
    assert written.status_code == 201
    browser = signed_in(app, setup["tokens"]["read-only"])
    pages, path = [], f"{CONSOLE}/big?order={order}"
    while path:
        answer = browser.get(html_module.unescape(path))
        assert answer.status_code == 200
        text = answer.get_data(as_text=True)
        assert len(text) < 6 * 1024 * 1024
        pages.append([int(n) for n in re.findall(r'<div class="text content">(\d):', text)])
        found = re.search(r'<a href="([^"]+)" rel="next">', text)
        path = found.group(1) if found else None
    expected = list(range(7, -1, -1)) if order == "desc" else list(range(8))
    assert pages == [expected[:5], expected[5:]]


# API keys (admin)


def test_an_admin_creates_a_key_whose_secret_is_shown_once_and_revokes_it(app, setup):
    browser = signed_in(app, setup["tokens"]["admin"])
    data = {
        "name": "frontend",
        "grants": f"{AGENT}=sessions:read, sessions:create\n\n*=events:create",
        "create_limit": "30/minute",
        "expires_at": "2999-01-01T00:00",
    }
    response = browser.post("/console/keys", data)
    html = response.get_data(as_text=True)
    assert response.status_code == 201 and 'data-copy="secret"' in html
    secret = (
        field(html, "secret")
        if 'name="secret"' in html
        else re.search(r'id="secret" value="([^"]+)"', html).group(1)
    )
    listed = setup["api"].get("/v2/api_keys?limit=100", headers=setup["admin"]).get_json()
    made = next(k for k in listed["api_keys"] if k["name"] == "frontend")
    assert made["grants"] == [
        {"agent": AGENT, "scopes": ["sessions:read", "sessions:create"]},
        {"agent": "*", "scopes": ["events:create"]},
    ]
    assert made["expires_at"] == "2999-01-01T00:00:00.000Z" and made["create_limit"] == "30/minute"
    assert setup["api"].get(API, headers={"x-api-key": secret}).status_code == 200
    keys_page = browser.get("/console/keys").get_data(as_text=True)
    assert made["id"] in keys_page and secret.split(".")[1] not in keys_page
    revoked = browser.post(f"/console/keys/{made['id']}/revoke")
    assert revoked.status_code == 303 and "notice=key_revoked" in revoked.headers["Location"]
    assert_error(setup["api"].get(API, headers={"x-api-key": secret}), 401, "unauthorized")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"name": ""}, "name: "),
        ({"name": "k", "grants": "support-bot"}, "Line 1: write AGENT=SCOPE"),
        ({"name": "k", "grants": "support-bot=sessions:fly"}, "grants.0.scopes.0: Must be one of"),
        ({"name": "k", "grants": "bad agent!=sessions:read"}, "grants.0.agent: "),
        ({"name": "k", "create_limit": "lots"}, "create_limit: Must be a rate limit"),
        ({"name": "k", "expires_at": "soon"}, "expires_at: "),
    ],
)
def test_a_key_the_api_would_refuse_is_refused_in_words(app, setup, data, words):
    browser = signed_in(app, setup["tokens"]["admin"])
    response = browser.post("/console/keys", data)
    assert response.status_code == 400
    assert words in response.get_data(as_text=True)
    listed = setup["api"].get("/v2/api_keys?limit=100", headers=setup["admin"]).get_json()
    assert len(listed["api_keys"]) == len(KINDS)


# The templates and static files themselves


def test_nothing_is_marked_safe_and_nothing_is_inline():
    templates = sorted((PACKAGE / "templates").rglob("*.html"))
    assert len(templates) >= 9
    for path in templates:
        text = path.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape" not in text, path
        assert "Markup" not in text and "tojson" not in text, path
        assert "<style" not in text and " style=" not in text, path
        assert re.findall(r"<script(?![^>]*\bsrc=)", text) == [], path
        assert re.search(r"\son[a-z]+=", text) is None, path  # no inline event handlers
    for path in PACKAGE.glob("*.py"):
        assert "Markup" not in path.read_text() and "|safe" not in path.read_text(), path


def test_page_and_display_helpers_never_build_html():
    from sessions_app.console import display

    source = (PACKAGE / "display.py").read_text()
    assert "<" not in source.replace("<details>", "").replace("->", "")
    assert pages.CONTENT_SECURITY_POLICY == CSP
    assert display.pretty({"a": "<b>"}) == '{\n  "a": "<b>"\n}'


def test_an_unknown_console_path_is_a_page_not_a_trace(app, setup):
    browser = signed_in(app, setup["tokens"]["full"])
    for path in ("/console/nope", "/console/agents/a%20b/sessions", "/console/agents/x/y/z"):
        response = browser.get(path)
        assert response.status_code == 404 and "no such page" in response.get_data(as_text=True)


@pytest.mark.parametrize(("proxies", "secure"), [(0, False), (1, True)])
def test_the_cookie_is_secure_behind_a_trusted_proxy_that_ends_tls(tmp_path, proxies, secure):
    app = create_app(
        {"TESTING": True, "STORAGE_URL": f"sqlite:///{tmp_path}/s.db", "PROXY_COUNT": proxies}
    )
    try:
        _, token = Keys(app).create(admin=True)
        client = app.test_client()
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
        page = client.get("/console/", headers=forwarded).get_data(as_text=True)
        data = {"api_key": token, "login_token": field(page, "login_token")}
        response = client.post("/console/login", data=data, headers=forwarded)
        cookie = next(
            c for c in response.headers.getlist("Set-Cookie") if c.startswith(signin.COOKIE + "=")
        )
        assert ("Secure" in cookie) is secure
    finally:
        app.extensions["agent_sessions"].storage.close()


def test_an_unexpected_error_is_a_page_without_a_trace(app, setup, monkeypatch, caplog):
    store = app.extensions["agent_sessions"].storage

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError(f"secret detail from {__file__}")

    monkeypatch.setattr(store, "list_recent_sessions", broken)
    browser = signed_in(app, setup["tokens"]["full"])
    response = browser.get(CONSOLE)
    html = response.get_data(as_text=True)
    assert response.status_code == 500 and "Something went wrong on our side" in html
    assert "secret detail" not in html and "Traceback" not in html and ".py" not in html
    assert_console_headers(response, "500")
    assert "secret detail" in caplog.text  # in the log, for the operator
