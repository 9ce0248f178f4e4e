"""API keys in SQL: create, read, list, revoke."""

from __future__ import annotations

import datetime as dt

from ..base import (
    ApiKey,
    ApiKeyNotFound,
    Conflict,
    Page,
)
from .dialect import SQLDialect
from .schema import API_KEY_PAGE, API_KEYS, GET_API_KEY, INSERT_API_KEY, REVOKE_API_KEY


class ApiKeyRecords(SQLDialect):
    """The API key operations of :class:`SQLStorage`."""

    def create_api_key(self, *, api_key: ApiKey) -> ApiKey:
        try:
            with self._writing() as conn:
                conn.execute(
                    self._sql(INSERT_API_KEY), self._encode(API_KEYS, api_key, API_KEYS.fields)
                )
        except self.unique_violation:
            raise Conflict(api_key.id) from None
        return api_key

    def get_api_key(self, *, key_id: str) -> ApiKey:
        with self._reading() as conn:
            row = conn.execute(self._sql(GET_API_KEY), [key_id]).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return self._record(API_KEYS, row)

    def list_api_keys(self, *, limit: int, after: int | None = None) -> Page:
        with self._reading() as conn:
            rows = conn.execute(
                self._sql(API_KEY_PAGE),
                [after or 0, limit + 1],
            ).fetchall()
        return self._page(API_KEYS, rows, limit)

    def revoke_api_key(self, *, key_id: str, now: dt.datetime) -> ApiKey:
        with self._writing() as conn:
            row = conn.execute(
                self._sql(REVOKE_API_KEY),
                [self.encode_ts(now), key_id],
            ).fetchone()
        if row is None:
            raise ApiKeyNotFound(key_id)
        return self._record(API_KEYS, row)
