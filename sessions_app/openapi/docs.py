"""The docs page: Swagger UI rendering the OpenAPI document, served by the service itself."""

from __future__ import annotations

import html
from collections.abc import Callable

from flask import abort, current_app, send_from_directory, url_for
from swagger_ui_bundle import swagger_ui_path
from werkzeug.wrappers import Response

from ..corridor import auth
from ..corridor.http import ServiceBlueprint
from . import EXTENSION, HTML_PAGE, JSON_OBJECT, document, operation

ASSET_MAX_AGE = 24 * 3600
ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")

# Nested in the API's blueprint (its error handlers and hooks); no key needed.
docs = ServiceBlueprint("docs", __name__)


def hidden(view: Callable) -> Callable:
    """Leave a route out of the document (the docs page's static assets)."""
    view.openapi_hidden = True  # type: ignore[attr-defined]
    return view


@docs.get("/openapi.json")
@auth.public
@operation("Service", 200, JSON_OBJECT)
def openapi_document() -> Response:
    """This OpenAPI document."""
    document(current_app)
    body = current_app.extensions[EXTENSION][1]
    return current_app.response_class(body, mimetype="application/json")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Agent Sessions API</title>
<link rel="stylesheet" href="{css}">
<link rel="icon" type="image/png" href="{icon}">
</head>
<body>
<div id="swagger-ui" data-spec-url="{spec}"></div>
<script src="{bundle}"></script>
<script src="{init}"></script>
</body>
</html>
"""

# A file rather than an inline script, so the page's CSP can forbid inline scripts.
INIT_JS = """\
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"""

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@docs.get("/docs")
@auth.public
@operation("Service", 200, HTML_PAGE)
def docs_page() -> Response:
    """An HTML page rendering this document (Swagger UI, served by the service itself)."""

    def asset(name: str) -> str:
        return html.escape(url_for(".docs_asset", name=name))

    page = PAGE.format(
        css=asset("swagger-ui.css"),
        icon=asset("favicon-32x32.png"),
        bundle=asset("swagger-ui-bundle.js"),
        init=asset("init.js"),
        spec=html.escape(url_for(".openapi_document")),
    )
    response = current_app.response_class(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


@docs.get("/docs/<name>")
@auth.public
@hidden
def docs_asset(name: str) -> Response:
    """Swagger UI's files, from the installed swagger-ui-bundle package."""
    if name == "init.js":
        response = current_app.response_class(INIT_JS, mimetype="text/javascript")
        response.cache_control.public = True
        response.cache_control.max_age = ASSET_MAX_AGE
        return response
    if name not in ASSETS:
        abort(404)
    return send_from_directory(swagger_ui_path, name, max_age=ASSET_MAX_AGE)
