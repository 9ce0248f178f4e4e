"""The console's blueprint: what every request walks, the error pages, and the pages to read.

Every request but the static files and the sign-in goes through :func:`guard`:
the sign-in cookie to a principal (else to the sign-in page), the API key's
rate limit, and on a POST the CSRF token of the sign-in. Pages answer with
:func:`page`: a template, the security headers, UTF-8 that cannot fail.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import urllib.parse
from typing import Any

from flask import Blueprint, current_app, g, redirect, render_template, request, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from . import signin
from .display import event_view, pretty
from .service import (
    EVENT_TYPES,
    SCOPES,
    AgentDisabled,
    AgentNotFound,
    ApiError,
    ApiKeyNotFound,
    Conflict,
    EventListQuerySchema,
    EventNotFound,
    ListQuerySchema,
    NotFound,
    PreconditionFailed,
    SessionDisabled,
    SessionListQuerySchema,
    SessionNotFound,
    Unavailable,
    auth,
    compile_filter,
    event_line,
    extension,
    format_ts,
    http,
    is_key,
    json_text,
    limits,
    session_etag,
    session_line,
    storage,
    utcnow,
    validation_error,
)

log = logging.getLogger(__name__)

# Stricter than asked of it: nothing loads but this app's own scripts, styles and images.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)

# What a redirect may say on the page it leads to: fixed words, never the URL's text.
NOTICES = {
    "signed_out": "You are signed out.",
    "expired": "Your console sign-in ended. Sign in again.",
    "ended": "The API key of your sign-in was revoked or has expired. Sign in with another.",
    "saved": "Saved.",
    "hidden": "The event is hidden.",
    "unhidden": "The event is shown again.",
    "event_deleted": "The event is deleted.",
    "session_deleted": "The session is deleted.",
    "forked": "This session is the fork you made.",
    "key_revoked": "The API key is revoked.",
}

SESSIONS_PER_PAGE = 25
EVENTS_PER_PAGE = 50
# A history page also ends once its events hold this many characters of JSON (its
# first event always shows): escaped, 50 events of EVENT_MAX_BYTES would be a page
# of tens of megabytes.
EVENTS_PAGE_MAX_CHARS = 1024 * 1024
AGENTS_PER_PAGE = 50

# Endpoints a signed-out visitor may reach (the sign-in page is the index).
PUBLIC = frozenset({"index", "login", "logout_page", "not_found"})
# Endpoints counted against ADMIN_LIMIT, as their API counterparts are.
ADMIN = frozenset({"keys", "create_key", "revoke_key"})


class ConsoleBlueprint(Blueprint):
    """The console's views stay out of the OpenAPI document (it describes the API)."""

    def add_url_rule(self, rule: str, endpoint: Any = None, view_func: Any = None, **kw: Any):
        if view_func is not None and not inspect.ismethod(view_func):
            view_func.openapi_hidden = True
        super().add_url_rule(rule, endpoint, view_func, **kw)


bp = ConsoleBlueprint(
    "agent_sessions_console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


def page(template: str, status: int = 200, headers: Any = None, **context: Any) -> Response:
    """A template rendered as the answer.

    Encoded with ``backslashreplace``: a lone surrogate in stored text (which
    no API write lets in, but a store may hold) shows as ``\\ud800``, never a 500.
    """
    html = render_template(f"console/{template}", **context)
    body = html.encode("utf-8", "backslashreplace")
    return current_app.response_class(body, status, headers, mimetype="text/html")


def endpoint_name() -> str:
    return (request.endpoint or "").rpartition(".")[2]


@bp.before_request
def guard() -> Response | None:
    """Sign-in, limit and CSRF, before any view (the static files need none of them)."""
    name = endpoint_name()
    if name == "static":
        return None
    if request.method == "POST" and request.headers.get("Sec-Fetch-Site") in (
        "cross-site",
        "same-site",
    ):
        return refused("This form was sent from another site; nothing was changed.")
    principal, why = signin.current()
    g.console = principal
    if principal is None:
        if name in PUBLIC:
            g.console_why = why
            return None
        target = {"next": request.full_path.rstrip("?")} if request.method == "GET" else {}
        if why:
            target["notice"] = why
        response = redirect(url_for(".index", **target), 303)
        signin.clear_cookie(response)
        return response
    key = principal.key
    g.api_key = key  # what auth.check reads, as on the API
    rate = limits()
    if name in ADMIN or (name == "index" and key.admin):
        rate.hit(rate.admin_limit, "admin", key.id)
    elif name == "fork_session" and request.method == "POST":
        rate.count_create(key, (request.view_args or {})["agent_key"])
    else:
        rate.hit(rate.default_limit, "api", key.id)
    if request.method == "POST" and name != "login":
        if not signin.same(request.form.get("csrf_token"), principal.csrf_token):
            return refused(
                "This form is not from your current sign-in (it may be from an older page, or "
                "another site); nothing was changed. Reload the page and try again."
            )
    return None


def refused(message: str) -> Response:
    return page("error.html", 403, title="Refused", messages=[message])


def is_console_path(path: str) -> bool:
    prefix = bp.url_prefix or ""
    return path == prefix or path.startswith(prefix + "/")


@bp.after_app_request
def security_headers(response: Response) -> Response:
    """The headers on every answer under /console, also those made before any console
    view runs (routing's redirect of ``/console``, a 405 for a method no URL takes)."""
    if not is_console_path(request.path):
        return response
    headers = response.headers
    for name, value in SECURITY_HEADERS:
        headers[name] = value
    if not extension().owns_app:
        # The standalone service's own hook adds it to every answer; a host's adds none.
        headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.context_processor
def helpers() -> dict[str, Any]:
    principal = g.get("console")
    key = principal.key if principal is not None else None

    def can(scope: str, agent_key: str) -> bool:
        return key is not None and key.allows(agent_key, scope)

    return {
        "principal": principal,
        "key": key,
        "csrf_token": principal.csrf_token if principal is not None else "",
        "can": can,
        "ts": lambda value: format_ts(value) if value is not None else "",
        "notice": NOTICES.get(request.args.get("notice", "")),
        "here": request.full_path.rstrip("?"),
    }


# Errors: plain words in the page, never a trace.

TITLES = {
    400: "That was refused",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed here",
    409: "Conflict",
    412: "Changed meanwhile",
    413: "Too large",
    429: "Too many requests",
    503: "Unavailable",
}


def describe(err: Exception) -> tuple[int, list[str], dict[str, str]]:
    """The status, messages and headers of the page for ``err``."""
    if isinstance(err, ValidationError):
        err = validation_error(err)
    if isinstance(err, ApiError):
        return err.status, err.messages, err.headers
    if isinstance(err, AgentNotFound):
        return 404, [f"There is no agent {err}."], {}
    if isinstance(err, SessionNotFound):
        return 404, [f"There is no session {err} (deleted, idled out, or never made)."], {}
    if isinstance(err, EventNotFound):
        return 404, [f"This session has no event {err}."], {}
    if isinstance(err, ApiKeyNotFound):
        return 404, [f"There is no API key {err}."], {}
    if isinstance(err, NotFound):
        return 404, ["Not found."], {}
    if isinstance(err, SessionDisabled):
        return 409, [f"Session {err} is disabled: it takes no new events."], {}
    if isinstance(err, AgentDisabled):
        return 409, [f"Agent {err} is disabled: it takes no new sessions."], {}
    if isinstance(err, Conflict):
        subject = str(err)
        if " " not in subject:  # a key, as the API words it
            what = "Event" if subject.startswith("aev_") else "Key"
            return 409, [f"{what} {subject} already exists."], {}
        return 409, [subject[:1].upper() + subject[1:] + "."], {}
    if isinstance(err, PreconditionFailed):
        return 412, ["It was changed by someone else meanwhile; nothing was changed."], {}
    if isinstance(err, Unavailable):
        log.warning("console answering 503: %s", err)
        retry = {"Retry-After": str(err.retry_after)}
        return 503, ["The service is temporarily unavailable; try again shortly."], retry
    if isinstance(err, HTTPException) and (err.code or 500) < 500:
        return err.code or 400, [err.description or err.name], {}
    log.exception("console: unhandled error (request_id=%s)", g.get("request_id"))
    return 500, ["Something went wrong on our side. It has been logged."], {}


@bp.errorhandler(Exception)
def error_page(err: Exception) -> Response:
    status, messages, headers = describe(err)
    title = TITLES.get(status, "Error")
    return page("error.html", status, headers, title=title, messages=messages)


# Query strings: loaded by the API's own schemas; the page's notice is not theirs.


def query_args(**defaults: str) -> tuple[dict[str, str], str | None]:
    """The request's query without ``notice``, with ``defaults``, and its ``page_key``.

    A field the page's form sent empty ("all types", no search) is left out.
    """
    args = {name: value for name, value in request.args.items() if value != ""}
    args.pop("notice", None)
    page_key = args.pop("page_key", None)
    for name, value in defaults.items():
        args.setdefault(name, value)
    return args, page_key


def bad_page_key() -> ApiError:
    return ApiError(
        400,
        "invalid_request",
        "page_key: Not a page key of this list in this order.",
        field_errors={"page_key": "Not a page key of this list in this order."},
    )


def safe_next(target: str | None, default: str) -> str:
    """``target`` when it is a path of this console (never another site), else ``default``."""
    if not target or not target.startswith(bp.url_prefix + "/"):
        return default
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or "//" in target:
        return default
    # A browser resolves "." and ".." (also written %2e) before it follows the path.
    if {".", ".."} & set(urllib.parse.unquote(parts.path).split("/")):
        return default
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in target):
        return default
    return target


# Pages


@bp.get("/")
def index() -> Response:
    """Signed out, the sign-in page; signed in, the agents."""
    if g.console is None:
        return sign_in_page()
    key = g.console.key
    if not key.admin:
        return page("agents.html", agents=None, grants=key.grants, next_page=None)
    args, page_key = query_args(limit=str(AGENTS_PER_PAGE))
    if page_key is not None:
        args["page_key"] = page_key
    query = ListQuerySchema().load(args)
    found = storage().list_agents(**query)
    next_key = http.encode_cursor(found.next_cursor)
    next_page = url_for(".index", page_key=next_key) if next_key else None
    store = storage()
    agents = [
        dataclasses.asdict(agent) | {"usage": store.get_usage(agent_key=agent.key)}
        for agent in found.items
    ]
    return page("agents.html", agents=agents, grants=None, next_page=next_page)


def sign_in_page(status: int = 200, error: str | None = None) -> Response:
    value = signin.login_token()
    why = g.get("console_why")
    notice = NOTICES.get(request.args.get("notice") or why or "")
    next_path = safe_next(request.values.get("next"), "")
    response = page(
        "login.html", status, login_token=value, error=error, next_path=next_path, notice=notice
    )
    signin.keep_login_token(response, value)
    if why:
        signin.clear_cookie(response)
    return response


@bp.get("/logout")
def logout_page() -> Response:
    """Signing out is a POST; this address leads back to the console."""
    return redirect(url_for(".index"), 303)


@bp.get("/agents/open")
def open_agent() -> Response:
    """Go to an agent by its key (for keys granted on every agent)."""
    agent_key = request.args.get("agent_key", "").strip()
    if not is_key(agent_key):
        raise ApiError(
            400,
            "invalid_request",
            "agent_key: an agent key is 1 to 64 letters, digits, '_' or '-'.",
        )
    return redirect(url_for(".sessions", agent_key=agent_key), 303)


@bp.get("/agents/<record_key:agent_key>/sessions")
def sessions(agent_key: str) -> Response:
    """An agent's sessions, newest first, searchable by name and description."""
    auth.check(agent_key, "sessions:read")
    agent = storage().get_agent(agent_key=agent_key)
    args, page_key = query_args(limit=str(SESSIONS_PER_PAGE))
    pattern = args.get("filter", "")
    scope = f"console-sessions/{agent_key}"
    found, error = None, None
    try:
        query = SessionListQuerySchema().load(args)
        before = None
        if page_key is not None:
            try:
                before = http.decode_scoped_cursor(page_key, scope=scope, descending=True)
            except ValueError:
                raise bad_page_key() from None
        text = query.pop("filter", None)
        matches = compile_filter(text) if text else None
        found = storage().list_recent_sessions(
            agent_key=agent_key,
            limit=query["limit"],
            now=utcnow(),
            before=before,
            matches=matches,
        )
    except (ValidationError, ApiError) as err:
        error = describe(err)[1]
    next_page = None
    if found is not None:
        next_key = http.encode_scoped_cursor(found.next_cursor, scope=scope, descending=True)
        if next_key:
            keep = {k: v for k, v in args.items() if k in ("filter", "limit")}
            next_page = url_for(".sessions", agent_key=agent_key, page_key=next_key, **keep)
    return page(
        "sessions.html",
        400 if error else 200,
        agent=agent,
        agent_key=agent_key,
        sessions=found.items if found is not None else [],
        pattern=pattern,
        error=error,
        next_page=next_page,
        first_page=page_key is not None,
    )


@bp.get("/agents/<record_key:agent_key>/sessions/<record_key:session_key>")
def history(agent_key: str, session_key: str) -> Response:
    """A session and a page of its history."""
    auth.check(agent_key, "sessions:read")
    store, now = storage(), utcnow()
    session = store.get_session(agent_key=agent_key, session_key=session_key, now=now)
    args, page_key = query_args(order="desc", limit=str(EVENTS_PER_PAGE))
    query = EventListQuerySchema().load(args)
    descending = query.pop("order") == "desc"
    scope = f"{agent_key}/{session_key}"  # the API's: its page keys work here, and back
    if page_key is not None:
        try:
            query["after"] = http.decode_scoped_cursor(page_key, scope=scope, descending=descending)
        except ValueError:
            raise bad_page_key() from None
    limit = query.pop("limit")
    read = functools.partial(
        store.list_events,
        agent_key=agent_key,
        session_key=session_key,
        now=now,
        descending=descending,
        **query,
    )
    found = read(limit=limit)
    fit = events_that_fit(found.items)
    if fit < len(found.items):
        # Read the shorter page again: its events and its cursor come from one read.
        found = read(limit=fit)
    view = {k: v for k, v in args.items() if k in ("order", "include_hidden", "type", "limit")}
    next_key = http.encode_scoped_cursor(found.next_cursor, scope=scope, descending=descending)
    next_page = None
    if next_key:
        next_page = url_for(
            ".history", agent_key=agent_key, session_key=session_key, page_key=next_key, **view
        )
    return page(
        "history.html",
        session=session,
        agent_key=agent_key,
        events=[event_view(event) for event in found.items],
        etag=session_etag(session),
        metadata_text=pretty(session.metadata),
        descending=descending,
        include_hidden=query["include_hidden"],
        types=sorted(query.get("types") or ()),
        type_choices=EVENT_TYPES,
        view=view,
        next_page=next_page,
        first_page=page_key is not None,
    )


def events_that_fit(events: list[Any]) -> int:
    """How many of ``events``, from the first, hold at most ``EVENTS_PAGE_MAX_CHARS``
    characters of JSON (at least one)."""
    total = 0
    for count, event in enumerate(events):
        total += len(json.dumps(event.fields, ensure_ascii=False))
        if total > EVENTS_PAGE_MAX_CHARS:
            return max(count, 1)
    return len(events)


@bp.get("/agents/<record_key:agent_key>/sessions/<record_key:session_key>/export.jsonl")
def export(agent_key: str, session_key: str) -> Response:
    """The session and its whole history as JSON Lines, the CLI's export format, streamed."""
    auth.check(agent_key, "sessions:read")
    store, now = storage(), utcnow()
    session = store.get_session(agent_key=agent_key, session_key=session_key, now=now)
    events = store.iter_events(agent_key=agent_key, session_key=session_key, now=now)

    def lines() -> Any:
        yield json_text(session_line(session), indent=None) + "\n"
        count = 0
        for event in events:
            yield json_text(event_line(event), indent=None) + "\n"
            count += 1
        yield json_text({"end": {"events": count}}, indent=None) + "\n"

    filename = f"{agent_key}-{session_key}.jsonl"  # both keys are [A-Za-z0-9_-]
    return current_app.response_class(
        (line.encode("utf-8", "backslashreplace") for line in lines()),
        200,
        [("Content-Disposition", f'attachment; filename="{filename}"')],
        mimetype="application/jsonl",
    )


@bp.get("/keys")
def keys() -> Response:
    """API keys (admin keys only)."""
    if not g.console.key.admin:
        raise ApiError(403, "forbidden", "Only an admin key may manage API keys.")
    return keys_page()


def keys_page(status: int = 200, **context: Any) -> Response:
    args, page_key = query_args(limit="50")
    if page_key is not None:
        args["page_key"] = page_key
    query = ListQuerySchema().load(args)
    found = storage().list_api_keys(**query)
    next_key = http.encode_cursor(found.next_cursor)
    context.setdefault("form", {})
    return page(
        "keys.html",
        status,
        api_keys=found.items,
        now=utcnow(),
        scopes=SCOPES,
        next_page=url_for(".keys", page_key=next_key) if next_key else None,
        **context,
    )


@bp.route("/<path:rest>", methods=["GET", "POST"])
def not_found(rest: str) -> Response:
    """Any other path under the console: a page saying so."""
    return page("error.html", 404, title="Not found", messages=["There is no such page."])
