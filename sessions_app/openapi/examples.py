"""Examples in the OpenAPI document, as the API answers them."""

# The public definition's example (docs.vectara.com, "Create agent session").
SESSION_REQUEST = {
    "key": "user_12345_session",
    "name": "Customer Support Session",
    "metadata": {"user_role": "premium", "language": "en"},
}
SESSION = {
    "key": "user_12345_session",
    "agent_key": "support-agent",
    "name": "Customer Support Session",
    "metadata": {"user_role": "premium", "language": "en"},
    "enabled": True,
    "tti_minutes": 0,
    "created_at": "2026-11-28T17:49:52.123Z",
    "updated_at": "2026-11-28T17:49:52.123Z",
}
AGENT = {
    "key": "support-agent",
    "name": "Support agent",
    "description": "Answers customer questions.",
    "metadata": {},
    "enabled": True,
    "created_at": "2026-11-28T17:40:00.000Z",
    "updated_at": "2026-11-28T17:40:00.000Z",
}
API_KEY_REQUEST = {
    "name": "support frontend",
    "grants": [{"agent": "support-agent", "scopes": ["sessions:create", "sessions:read"]}],
}
EVENT_REQUEST = {
    "type": "input_message",
    "messages": [{"type": "text", "content": "I need help with my widget installation"}],
}
EVENT = {
    "id": "aev_5f0c2a9d8b7e4f3a1c6d2e0b",
    "session_key": "user_12345_session",
    "type": "input_message",
    "created_at": "2026-11-28T17:50:03.456Z",
    "messages": [{"type": "text", "content": "I need help with my widget installation"}],
}
EVENT_BATCH_REQUEST = {
    "events": [
        {
            "type": "tool_input",
            "tool_call_id": "call_1",
            "tool_configuration_name": "kb",
            "tool_name": "search",
            "tool_input": {"query": "widget installation"},
        },
        {"type": "agent_output", "content": "First, unpack the widget."},
    ],
    "if_last_event_id": "aev_5f0c2a9d8b7e4f3a1c6d2e0b",
    "metadata_patch": {"last_topic": "installation"},
}
