"""How each kind of event is drawn for reading: plain values for the templates, never HTML.

An event's content is whatever the agent or the user sent, so it only ever
reaches the page as text for Jinja to escape: messages and outputs as text,
JSON values formatted and shown as text, tool calls and thinking folded.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .service import format_ts

TYPE_LABELS = {
    "input_message": "User input",
    "agent_output": "Agent output",
    "thinking": "Thinking",
    "tool_input": "Tool call",
    "tool_output": "Tool output",
    "structured_output": "Structured output",
    "step_transition": "Step transition",
    "skill_load": "Skill loaded",
    "compaction": "Compaction summary",
    "session_interrupted": "Interrupted",
}
HIDE_REASONS = {"manual": "hidden by hand", "compaction": "hidden by a compaction"}


@dataclasses.dataclass
class Block:
    """One piece of an event: ``kind`` "text" (shown with its line breaks) or "json"
    (formatted, monospaced); ``folded`` ones sit in a <details> titled ``title``."""

    title: str
    value: str
    kind: str = "text"
    folded: bool = False


@dataclasses.dataclass
class EventView:
    id: str
    type: str
    label: str
    created_at: str
    hide_reason: str | None
    hidden_because: str | None
    summary: str  # one line under the label (a tool's name, a step's move), or ""
    blocks: list[Block]


def pretty(value: Any) -> str:
    """A JSON value as indented text (characters kept as they are, for reading)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def text(value: Any) -> str:
    return value if isinstance(value, str) else pretty(value)


def event_view(event: Any) -> EventView:
    fields = dict(event.fields)
    metadata = fields.pop("metadata", None)
    summary, blocks = _draw(event.type, fields)
    if metadata is not None:
        blocks.append(Block("Metadata", pretty(metadata), "json", folded=True))
    return EventView(
        id=event.id,
        type=event.type,
        label=TYPE_LABELS.get(event.type, event.type),
        created_at=format_ts(event.created_at),
        hide_reason=event.hide_reason,
        hidden_because=HIDE_REASONS.get(event.hide_reason or "", event.hide_reason),
        summary=summary,
        blocks=blocks,
    )


def _draw(kind: str, fields: dict[str, Any]) -> tuple[str, list[Block]]:
    if kind == "input_message":
        blocks = []
        for message in fields.pop("messages", []):
            if isinstance(message, dict) and message.get("type") == "skill":
                blocks.append(Block("Skill", f"Skill: {text(message.get('skill_name'))}"))
            elif isinstance(message, dict):
                blocks.append(Block("Message", text(message.get("content", ""))))
        return "", blocks + _rest(fields)
    if kind == "agent_output":
        return "", [Block("Output", text(fields.pop("content", ""))), *_rest(fields)]
    if kind == "thinking":
        content = fields.pop("content", None)
        blocks = [] if content is None else [Block("Thinking", text(content), folded=True)]
        return "", blocks + _rest(fields)
    if kind in ("tool_input", "tool_output"):
        name = text(fields.pop("tool_name", ""))
        configuration = text(fields.pop("tool_configuration_name", ""))
        call = text(fields.pop("tool_call_id", ""))
        summary = f"{name} ({configuration}), call {call}"
        if kind == "tool_output" and fields.pop("error", False):
            summary += ": failed"
        else:
            fields.pop("error", None)
        body = fields.pop(kind, None)
        title = "Input" if kind == "tool_input" else "Output"
        return summary, [Block(title, pretty(body), "json", folded=True), *_rest(fields)]
    if kind == "structured_output":
        schema = text(fields.pop("schema_name", ""))
        content = fields.pop("content", None)
        return f"schema {schema}", [Block("Content", pretty(content), "json"), *_rest(fields)]
    if kind == "step_transition":
        summary = f"{text(fields.pop('from_step', ''))} to {text(fields.pop('to_step', ''))}"
        return summary, [Block("Content", text(fields.pop("content", ""))), *_rest(fields)]
    if kind == "skill_load":
        summary = text(fields.pop("skill_name", ""))
        content = Block("Content", text(fields.pop("content", "")), folded=True)
        return summary, [content, *_rest(fields)]
    if kind == "compaction":
        turns, events = fields.pop("turns_compacted", 0), fields.pop("events_compacted", 0)
        fields.pop("summary_key", None)
        summary = f"{_count(turns, 'turn')} and {_count(events, 'event')} compacted"
        return summary, [Block("Summary", text(fields.pop("summary_text", ""))), *_rest(fields)]
    return "", _rest(fields)


def _count(number: Any, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _rest(fields: dict[str, Any]) -> list[Block]:
    """Fields this view does not know (a newer type, ``behavior``...), as JSON."""
    return [Block(name, pretty(value), "json", folded=True) for name, value in fields.items()]
