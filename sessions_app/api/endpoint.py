"""The /v2 blueprint: short declarative views, one success code each.

A view says which schemas load its query and body and which shapes its answer
(:func:`endpoint`); the OpenAPI document reads the same declaration. The
corridor of a request: the request id (``http.start_request``), the key
(``auth.authenticate``), the grant (``auth.require``), the limit, the query and
body, one storage call, the answer, the contract headers (``http.contract_headers``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import current_app, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from storage_backends import Page, SessionNotFound, codec
from storage_backends.base import Event
from storage_backends.codec import utcnow

from ..corridor import auth, errors, etags, http, idempotency, rate_limits, responses
from ..corridor.errors import ApiError
from ..naming import new_event_id
from ..openapi import Operation
from ..openapi.docs import docs
from ..schemas.events import check_size

bp = http.ServiceBlueprint(http.SERVICE_BLUEPRINT, __name__)
bp.before_request(rate_limits.guard_authentication(auth.authenticate))
bp.register_blueprint(docs)
errors.register(bp)  # the API's and the docs page's, wherever the blueprint is mounted

# Statuses of a request whose query or body is refused.
BAD_INPUT = (400, 413, 415)
# The refusal of a query parameter given more than once.
GIVEN_TWICE = "Given more than once; give it once."


def service() -> Any:
    """This app's storage and limits (``app.extensions["agent_sessions"]``)."""
    return current_app._get_current_object().extensions["agent_sessions"]


def check_path(agent_key: str | None = None, session_key: str | None = None) -> None:
    """Raise the 404 the path earns, the agent's first: it comes before a 400 for the input."""
    storage = service().storage
    if agent_key is not None:
        storage.get_agent(agent_key=agent_key)
        if session_key is not None:
            storage.get_session(agent_key=agent_key, session_key=session_key, now=utcnow())


def _is_bad_input(err: Exception) -> bool:
    if isinstance(err, ValidationError):
        return True
    if isinstance(err, ApiError):
        return err.status in BAD_INPUT
    return isinstance(err, HTTPException) and err.code in BAD_INPUT


def endpoint(
    tag: str,
    status: int,
    response: type[Schema] | None = None,
    *,
    body: type[Schema] | None = None,
    query: type[Schema] | None = None,
    body_limit: str | None = None,
    authorize: Callable[[dict[str, str], dict[str, Any]], None] | None = None,
    etag: type[Schema] | None = None,
    idempotent: bool = False,
    creates_session: Callable[[Any], bool] | None = None,
    **described: Any,
) -> Callable:
    """Declare a view: its query and body schemas (loaded into ``query=`` and ``body=``),
    the schema dumping what it returns (an object, or an object and headers; a
    Response goes out as it is) and its status.

    ``body_limit`` names the configuration key bounding the body's bytes
    (default: ``MAX_CONTENT_LENGTH``). ``authorize`` sees the path and the
    parsed body before the schema does: a permission that depends on the body
    is a 403 before any 404 or 400.

    ``etag`` is the schema of the record the path names (:mod:`.etags`): its
    answers carry the record's ``ETag``; a GET checks ``If-Match`` and
    ``If-None-Match`` against it (412, 304), and a PATCH or DELETE hands them
    to the view as ``precondition=``, for the storage to check in the write's
    own transaction. A create (POST) only answers the tag.

    ``idempotent``: a POST that creates something, which takes an
    ``Idempotency-Key`` (:mod:`.idempotency`): once its body is read and its
    permissions checked, the rest runs once per key, and retries get its answer.

    ``creates_session``, given the parsed body, says whether it may create the
    session the path names: a bad query or body is then a 404 only for a missing
    agent (a missing session is what it asks to create).

    The order of refusals is the contract's: a bad query or body is a 400 only
    once the records the path names are known to exist (404 before 400), and a
    missing session of a missing agent is ``agent_not_found``.
    """
    query_schema = query() if query is not None else None
    query_names = (
        {field.data_key or name for name, field in query_schema.load_fields.items()}
        if query_schema is not None
        else set()
    )
    body_schema = body() if body is not None else None
    response_schema = response() if response is not None else None
    etag_schema = etag() if etag is not None else None
    same_tag = etag is None or response is etag
    declared = Operation(
        tag,
        status,
        response,
        body=body,
        query=query,
        etag=etag is not None,
        idempotent=idempotent,
        **described,
    )

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(**path: str) -> Response:
            inputs: dict[str, Any] = {}
            conditions = method = raw = None
            req = request._get_current_object()  # one look through the proxy (see http.py)
            environ = req.environ
            try:
                if etag_schema is not None:
                    method = environ["REQUEST_METHOD"]
                    if method != "POST":
                        conditions = etags.Conditions.of_request(environ, etag_schema)
                    if method in ("PATCH", "DELETE"):
                        inputs["precondition"] = conditions
                if query_schema is not None:
                    # No parameter repeats (a list, such as type, is comma-separated):
                    # a second value is refused, never silently dropped.
                    # (An unknown one is left to the schema, which names it as unknown.)
                    repeated = [
                        name
                        for name, values in req.args.lists()
                        if len(values) > 1 and name in query_names
                    ]
                    if repeated:
                        raise ValidationError(dict.fromkeys(repeated, [GIVEN_TWICE]))
                    inputs["query"] = query_schema.load(req.args.to_dict())
                elif environ.get("QUERY_STRING") and req.args:
                    raise ValidationError(dict.fromkeys(req.args, ["Unknown field."]))
                if body_schema is not None:
                    key = idempotency.requested(environ) if idempotent else None
                    limit = None
                    if body_limit:
                        limit = current_app._get_current_object().config[body_limit]
                    raw = http.json_object(limit, req)
                    if authorize is not None:
                        authorize(path, raw)
                    if key is not None:
                        return idempotency.remembered(
                            key,
                            raw,
                            functools.partial(respond, path, inputs, None, conditions),
                            functools.partial(load_body, path, inputs, raw),
                        )
            except (ValidationError, ApiError, HTTPException) as err:
                if _is_bad_input(err):
                    check_path(path.get("agent_key"), session_of(path, raw))
                raise
            return respond(path, inputs, raw, conditions if method in ("GET", "HEAD") else None)

        def session_of(path: dict[str, str], raw: Any) -> str | None:
            """The session whose absence is a 404 before the input's 400."""
            if creates_session is not None and isinstance(raw, dict) and creates_session(raw):
                return None
            return path.get("session_key")

        def load_body(path: dict[str, str], inputs: dict[str, Any], raw: Any) -> None:
            """The body loaded by its schema into ``inputs`` (before an Idempotency-Key's
            unit of work, which then holds the writer only for the view)."""
            try:
                inputs["body"] = body_schema.load(raw)
            except (ValidationError, ApiError, HTTPException) as err:
                if _is_bad_input(err):
                    check_path(path.get("agent_key"), session_of(path, raw))
                raise

        def respond(
            path: dict[str, str],
            inputs: dict[str, Any],
            raw: Any,
            conditions: etags.Conditions | None,
        ) -> Response:
            """The view's answer, once the request is read (and, with an Idempotency-Key,
            claimed): the body loaded (``raw``; None once loaded), the view run, its result
            dumped."""
            try:
                if raw is not None:
                    inputs["body"] = body_schema.load(raw)
                result = view(**path, **inputs)
            except (ValidationError, ApiError, HTTPException) as err:
                if _is_bad_input(err):
                    check_path(path.get("agent_key"), session_of(path, raw))
                raise
            except SessionNotFound:
                check_path(path.get("agent_key"))
                raise
            if response_schema is None:
                return responses.no_content()
            if isinstance(result, Response):
                return result
            obj, headers = result if isinstance(result, tuple) else (result, None)
            if etag_schema is None:
                return responses.json_response(response_schema.dump(obj), status, headers)
            data = etags.representation(response_schema.dump(obj))
            # The record's tag: an answer may carry more than the record (an agent's usage).
            etag = etags.tag(data if same_tag else etags.representation(etag_schema.dump(obj)))
            if conditions is not None:  # a read's (a write's are the storage's to check)
                if not conditions.matches(etag):
                    return errors.precondition_failed()
                if not conditions.none_match(etag):
                    return responses.not_modified([*(headers or ()), ("ETag", etag)])
            response = responses.json_data_response(data, status, headers)
            # Added last: each header the response sets meanwhile scans those before it.
            response.headers.add("ETag", etag)
            return response

        wrapper.operation = declared  # type: ignore[attr-defined]
        return wrapper

    return decorator


def page_body(page: Page, name: str) -> dict[str, Any]:
    return {name: page.items, "metadata": {"page_key": http.encode_cursor(page.next_cursor)}}


def created(key: str) -> list[tuple[str, str]]:
    """The Location of a record just created by a POST to its collection (this request's path).

    Cheaper than ``url_for``, and it keeps whatever prefix the blueprint is mounted at.
    """
    return [("Location", f"{request._get_current_object().path}/{key}")]


def compile_filter(pattern: str) -> Any:
    """The list filter, compiled by the storage codec; a bad one is a 400."""
    try:
        return codec.compile_filter(pattern, current_app.config["FILTER_MAX_LENGTH"])
    except ValueError as err:
        raise ApiError(400, "invalid_request", f"filter: {err}") from None


def compaction_event(session_key: str, summary_text: str, now: Any) -> Event:
    """A compaction event to write (the backend counts what it hid, and checks the
    result with :func:`check_compaction`). Its summary is the event itself, so its
    ``summary_key`` is its id."""
    event_id = new_event_id()
    return Event(
        id=event_id,
        session_key=session_key,
        type="compaction",
        fields={"summary_text": summary_text, "summary_key": event_id},
        created_at=now,
    )


def check_compaction(field: str) -> Callable[[Event], None]:
    """What compact and fork have the storage call on the compaction event as it is
    about to be stored, its counts set: 413 ``payload_too_large`` (naming ``field``,
    the summary's) when it passes ``EVENT_MAX_BYTES``, and then nothing is written."""
    return functools.partial(check_size, field)
