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
