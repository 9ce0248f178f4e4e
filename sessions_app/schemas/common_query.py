"""A query schema's common case, loaded without Marshmallow's per-call machinery.

Most list requests send a few parameters of plain values (``limit=20``,
``order=desc``, ``include_hidden=true``) or none. Marshmallow's ``load`` of
such a query costs over 100k instructions, most of it bookkeeping around
fields that end up as their defaults. :class:`CommonQueryLoad` answers that
case from the fields' own declarations: a field whose class has a
``load_text(text)`` hook, or a plain string field whose only validators are
``OneOf``, loads its text directly; a query made only of such parameters
loads as the fields' ``load_default`` values updated with theirs. Anything
else (an unknown parameter, a value the hook does not take, a field with no
hook) goes through ``Schema.load`` whole, which accepts or refuses it with
its own messages, so the shortcut never decides a refusal.

A ``load_text`` hook returns :data:`NOT_COMMON` for any text it does not
take, and for the text it takes the value the full load (the schema's
``pre_load`` hooks included) gives: tests/test_common_query.py holds the two
paths to the same answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import Schema, fields, missing, validate

#: What a field's ``load_text`` hook returns for a text it leaves to the full load.
NOT_COMMON = object()


def text_loader(field: fields.Field) -> Callable[[str], Any] | None:
    """The field's loader of a query's text, or None when only the full load may read it."""
    hook = getattr(field, "load_text", None)
    if hook is not None:
        return hook
    if type(field) is fields.String and field.validators:
        if all(isinstance(check, validate.OneOf) for check in field.validators):
            choices = frozenset.intersection(
                *(frozenset(check.choices) for check in field.validators)
            )
            return lambda text: text if text in choices else NOT_COMMON
    return None


class CommonQueryLoad(Schema):
    """A query schema whose common case skips Marshmallow's machinery (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._common_defaults: dict[str, Any] | None = {}
        self._common_loaders: dict[str, tuple[str, Callable[[str], Any]]] = {}
        for name, field in self.load_fields.items():
            attribute = field.attribute or name
            if field.load_default is not missing:
                if callable(field.load_default):  # a fresh value each load: no shortcut
                    self._common_defaults = None
                    return
                self._common_defaults[attribute] = field.load_default
            loader = text_loader(field)
            if loader is not None and not field.required:
                self._common_loaders[field.data_key or name] = (attribute, loader)

    def load(self, data: Any, *, many: Any = None, partial: Any = None, unknown: Any = None):
        defaults = self._common_defaults
        if (
            defaults is not None
            and many is None
            and partial is None
            and unknown is None
            and not self.many
            and not self.partial
            and isinstance(data, Mapping)
        ):
            loaded = dict(defaults)
            loaders = self._common_loaders
            for name, text in data.items():
                found = loaders.get(name)
                if found is None or type(text) is not str:
                    break
                value = found[1](text)
                if value is NOT_COMMON:
                    break
                loaded[found[0]] = value
            else:
                return loaded
        return super().load(data, many=many, partial=partial, unknown=unknown)
