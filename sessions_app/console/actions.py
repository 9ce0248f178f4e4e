"""What the console changes: every one a POST that :func:`pages.guard` let through
(signed in, within the key's limit, with the sign-in's CSRF token).

Each write checks the key's grant with the API's own check, loads its input
with the API's schema, and makes the API's one storage call, so the console
can store nothing the API would refuse. Success is a 303 to a page (with a
fixed notice); refused input is the form again, with the reasons in words.
"""

from __future__ import annotations

import functools
import urllib.parse
from typing import Any

from flask import g, redirect, request, url_for
from marshmallow import ValidationError
from werkzeug.wrappers import Response

from . import signin
from .display import pretty
from .pages import bp, describe, keys_page, page, safe_next, sign_in_page
from .service import (
    HIDDEN_MANUAL,
    ApiError,
    ApiKeyCreateSchema,
    Conflict,
    Grant,
    PreconditionFailed,
    Session,
    SessionCreateSchema,
    SessionUpdateSchema,
    auth,
    create_with_generated_key,
    extension,
    flatten_messages,
    fork,
    http,
    if_match,
    metrics,
    session_etag,
    storage,
    utcnow,
)

SESSION = "/agents/<record_key:agent_key>/sessions/<record_key:session_key>"
EVENT = SESSION + "/events/<event_id:event_id>"


def done(target: str, notice: str) -> Response:
    """303 to ``target`` (a console path) with ``notice`` in its query."""
    parts = urllib.parse.urlsplit(target)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "notice"]
    query.append(("notice", notice))
    return redirect(parts._replace(query=urllib.parse.urlencode(query)).geturl(), 303)


def back_to_history(agent_key: str, session_key: str) -> str:
    """The page of the history the form was on (its ``back`` field), else the first page."""
    history = url_for(".history", agent_key=agent_key, session_key=session_key)
    back = safe_next(request.form.get("back"), history)
    if back != history and not back.startswith(history + "?"):
        return history
    return back


# Signing in and out


@bp.post("/login")
def login() -> Response:
    """Exchange an API key for a console sign-in."""
    if not signin.login_form_is_ours():
        message = "This sign-in form has expired or is not from this console. Try again."
        return sign_in_page(403, message)
    key = signin.check_key(request.form.get("api_key", ""))
    if key is None:
        return sign_in_page(401, "That API key is not valid: unknown, revoked or expired.")
    signin.end()  # a sign-in the browser still had: a new token every time
    token, _ = signin.start(key)
    target = safe_next(request.form.get("next"), url_for(".index"))
    response = redirect(target, 303)
    signin.set_cookie(response, token)
    return response


@bp.post("/logout")
def logout() -> Response:
    """End this sign-in."""
    signin.end()
    response = redirect(url_for(".index", notice="signed_out"), 303)
    signin.clear_cookie(response)
    return response


# Events


@bp.post(EVENT + "/hide")
def hide_event(agent_key: str, session_key: str, event_id: str) -> Response:
    """Hide an event from lists, as ``POST .../events/{id}/hide`` does."""
    auth.check(agent_key, "sessions:update")
    storage().set_event_hidden(
        agent_key=agent_key,
        session_key=session_key,
        event_id=event_id,
        hide_reason=HIDDEN_MANUAL,
        now=utcnow(),
    )
    return done(back_to_history(agent_key, session_key), "hidden")


@bp.post(EVENT + "/unhide")
def unhide_event(agent_key: str, session_key: str, event_id: str) -> Response:
    """Show a hidden event again."""
    auth.check(agent_key, "sessions:update")
    storage().set_event_hidden(
        agent_key=agent_key,
        session_key=session_key,
        event_id=event_id,
        hide_reason=None,
        now=utcnow(),
    )
    return done(back_to_history(agent_key, session_key), "unhidden")


@bp.post(EVENT + "/delete")
def delete_event(agent_key: str, session_key: str, event_id: str) -> Response:
    """Delete an event from the history."""
    auth.check(agent_key, "sessions:delete")
    storage().delete_event(
        agent_key=agent_key, session_key=session_key, event_id=event_id, now=utcnow()
    )
    return done(back_to_history(agent_key, session_key), "event_deleted")


# Sessions


@bp.post(SESSION + "/delete")
def delete_session(agent_key: str, session_key: str) -> Response:
    """Delete a session and its history."""
    auth.check(agent_key, "sessions:delete")
    storage().delete_session(agent_key=agent_key, session_key=session_key, now=utcnow())
    return done(url_for(".sessions", agent_key=agent_key), "session_deleted")


@bp.route(SESSION + "/edit", methods=["GET", "POST"])
def edit_session(agent_key: str, session_key: str) -> Response:
    """Change a session's name, description, metadata, idle expiry and ``enabled``, guarded
    by its ETag (If-Match) so that an edit made meanwhile is not overwritten unseen."""
    auth.check(agent_key, "sessions:update")
    store, now = storage(), utcnow()
    session = store.get_session(agent_key=agent_key, session_key=session_key, now=now)
    if request.method == "GET":
        return edit_page(session, session_form(session), session_etag(session))
    form = {
        "name": request.form.get("name", ""),
        "description": request.form.get("description", ""),
        "metadata": request.form.get("metadata", ""),
        "tti_minutes": request.form.get("tti_minutes", "").strip(),
        "enabled": request.form.get("enabled") == "on",
    }
    etag = request.form.get("etag", "")
    changes, errors = session_changes(form)
    if errors:
        return edit_page(session, form, etag, errors=errors, status=400)
    try:
        store.update_session(
            agent_key=agent_key,
            session_key=session_key,
            changes=changes,
            now=now,
            precondition=if_match(etag),
        )
    except PreconditionFailed:
        current = store.get_session(agent_key=agent_key, session_key=session_key, now=now)
        return edit_page(current, form, session_etag(current), conflict=True, status=412)
    return done(url_for(".history", agent_key=agent_key, session_key=session_key), "saved")


def session_form(session: Any) -> dict[str, Any]:
    return {
        "name": session.name,
        "description": session.description or "",
        "metadata": pretty(session.metadata),
        "tti_minutes": str(session.tti_minutes),
        "enabled": session.enabled,
    }


def session_changes(form: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The form as a PATCH body, loaded by the API's schema; or the reasons it is refused."""
    errors: dict[str, str] = {}
    body: dict[str, Any] = {
        "name": form["name"],
        "description": form["description"],
        "enabled": form["enabled"],
    }
    try:
        body["metadata"] = http.parse((form["metadata"].strip() or "{}").encode())
    except ValueError as err:
        errors["metadata"] = f"Not valid JSON: {err}."
    tti = form["tti_minutes"] or "0"
    if tti.isascii() and tti.isdigit() and len(tti) <= 12:
        body["tti_minutes"] = int(tti)
    else:
        errors["tti_minutes"] = "A whole number of minutes (0: never)."
    if errors:
        return {}, errors
    try:
        return SessionUpdateSchema().load(body), {}
    except ValidationError as err:
        return {}, flatten_messages(err.messages)


def edit_page(
    session: Any,
    form: dict[str, Any],
    etag: str,
    *,
    errors: dict[str, str] | None = None,
    conflict: bool = False,
    status: int = 200,
) -> Response:
    return page(
        "edit.html",
        status,
        session=session,
        agent_key=session.agent_key,
        form=form,
        etag=etag,
        errors=errors or {},
        conflict=conflict,
    )


@bp.route(SESSION + "/fork", methods=["GET", "POST"])
def fork_session(agent_key: str, session_key: str) -> Response:
    """Start a new session with a copy of this one's visible history (up to an event,
    optionally compacted), as a create with ``from_session`` does."""
    auth.check(agent_key, "sessions:create")
    auth.check(agent_key, "sessions:read", "the source session's agent")
    store, now = storage(), utcnow()
    source = store.get_session(agent_key=agent_key, session_key=session_key, now=now)
    event_id = request.values.get("event_id", "") or None
    if request.method == "GET":
        form = {"name": f"{source.name} (fork)"[:255], "key": "", "summary_text": ""}
        return fork_page(source, event_id, form)
    form = {
        "name": request.form.get("name", ""),
        "key": request.form.get("key", "").strip(),
        "compact": request.form.get("compact") == "on",
        "summary_text": request.form.get("summary_text", ""),
    }
    origin: dict[str, Any] = {"session_key": session_key}
    if event_id is not None and form["compact"]:
        origin["compact_up_to_event_id"] = event_id
        origin["summary_text"] = form["summary_text"] or None
    elif event_id is not None:
        origin["include_up_to_event_id"] = event_id
    body: dict[str, Any] = {"name": form["name"], "key": form["key"] or None}
    body["from_session"] = origin
    try:
        loaded = SessionCreateSchema().load(body)
    except ValidationError as err:
        return fork_page(source, event_id, form, flatten_messages(err.messages), 400)
    key = loaded.pop("key", None)
    origin = loaded.pop("from_session")
    new = Session(agent_key=agent_key, key=key or "", created_at=now, updated_at=now, **loaded)
    create = functools.partial(fork, source=origin, now=now)
    try:
        new = create(session=new) if key is not None else create_with_generated_key(new, create)
    except (Conflict, ApiError) as err:
        _, messages, _ = describe(err)
        return fork_page(source, event_id, form, {"key": " ".join(messages)}, 409)
    metrics.session_created(extension().metrics)
    return done(url_for(".history", agent_key=agent_key, session_key=new.key), "forked")


def fork_page(
    source: Any,
    event_id: str | None,
    form: dict[str, Any],
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    return page(
        "fork.html",
        status,
        session=source,
        agent_key=source.agent_key,
        event_id=event_id,
        form=form,
        errors=errors or {},
    )


# API keys (admin keys only)


def admin_only() -> None:
    if not g.console.key.admin:
        raise ApiError(403, "forbidden", "Only an admin key may manage API keys.")


@bp.post("/keys")
def create_key() -> Response:
    """Make an API key; its secret is shown on the answer's page, once."""
    admin_only()
    form = {
        "name": request.form.get("name", ""),
        "grants": request.form.get("grants", ""),
        "admin": request.form.get("admin") == "on",
        "create_limit": request.form.get("create_limit", "").strip(),
        "expires_at": request.form.get("expires_at", "").strip(),
    }
    body, errors = key_body(form)
    if errors:
        return keys_page(400, form=form, errors=errors)
    try:
        loaded = ApiKeyCreateSchema().load(body)
    except ValidationError as err:
        return keys_page(400, form=form, errors=flatten_messages(err.messages))
    loaded["grants"] = [Grant(grant["agent"], tuple(grant["scopes"])) for grant in loaded["grants"]]
    key, token = auth.new_api_key(**loaded)
    return page("key_created.html", 201, new_key=key, secret=token)


def key_body(form: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The form as a ``POST /v2/api_keys`` body: grants one per line, ``AGENT=SCOPE,SCOPE``
    as the CLI's ``--grant`` takes them, and the expiry in UTC."""
    grants, errors = [], {}
    for number, line in enumerate(form["grants"].splitlines(), 1):
        if not line.strip():
            continue
        agent, equals, scopes = line.strip().partition("=")
        if not equals or not agent.strip() or not scopes.strip():
            errors["grants"] = f"Line {number}: write AGENT=SCOPE,SCOPE (or *=SCOPE)."
            break
        grants.append(
            {"agent": agent.strip(), "scopes": [s.strip() for s in scopes.split(",") if s.strip()]}
        )
    body: dict[str, Any] = {"name": form["name"], "grants": grants, "admin": form["admin"]}
    if form["create_limit"]:
        body["create_limit"] = form["create_limit"]
    expires = form["expires_at"]
    if expires:
        # A datetime-local field has no zone: the form says it is UTC.
        has_zone = expires.endswith("Z") or "+" in expires[10:] or "-" in expires[10:]
        body["expires_at"] = expires if has_zone else expires + "+00:00"
    return body, errors


@bp.post("/keys/<api_key_id:key_id>/revoke")
def revoke_key(key_id: str) -> Response:
    """Revoke an API key (its console sign-ins end at their next request)."""
    admin_only()
    storage().revoke_api_key(key_id=key_id, now=utcnow())
    extension().key_cache.forget(key_id)
    return done(url_for(".keys"), "key_revoked")
