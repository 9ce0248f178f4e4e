"""The /v2 API: the blueprint and its declarative endpoint (endpoint.py), then one module of
views per resource. Importing this package registers every route on :data:`bp`."""

from .endpoint import bp

# isort: off
# The routes in the order the OpenAPI document lists them.
from . import sessions, events, state, agents, api_keys  # noqa: F401
# isort: on

__all__ = ["bp"]
