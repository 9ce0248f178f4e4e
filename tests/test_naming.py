"""Keys generated from names stay within Vectara's published bound of 50 characters."""

from __future__ import annotations

import re

import pytest

from sessions_app.naming import key_candidates

URL = "/v2/agents/support-bot/sessions"
GENERATED = re.compile(r"^[0-9a-zA-Z_-]{1,50}$")

LONG_NAMES = [
    "Customer support conversation about a broken on-board computer in a rental car",
    "x" * 255,
    "会话测试关于一个非常长的名字的客户支持对话以及更多的内容在这里继续写下去",
    "Очень длинное название разговора службы поддержки клиентов о сломанном компьютере",
    "Ünïcödé wörds 🎉 mïxed with ASCII and emoji 🎉 that go on and on and on and on",
]


@pytest.mark.parametrize("name", LONG_NAMES)
def test_every_candidate_is_within_50_characters(name):
    candidates = list(key_candidates(name))
    assert len(candidates) == len(set(candidates))
    assert all(GENERATED.match(key) for key in candidates), candidates
    suffixed = candidates[1:]
    # The suffix is whole and follows the start of the slug, never cut into it.
    assert all(re.search(r"-[0-9a-f]{6,}$", key) for key in suffixed), suffixed
    assert all(candidates[0].startswith(key.rpartition("-")[0]) for key in suffixed), candidates


@pytest.mark.parametrize("name", LONG_NAMES)
def test_many_sessions_of_one_long_name_get_keys_within_50_characters(client, full, name):
    keys = []
    for _ in range(25):
        response = client.post(URL, json={"name": name}, headers=full)
        assert response.status_code == 201, response.json
        keys.append(response.get_json()["key"])
    assert len(set(keys)) == len(keys)
    assert all(GENERATED.match(key) for key in keys), [k for k in keys if len(k) > 50]
    assert any(len(key) > 45 for key in keys)  # the names are long enough to reach the bound


def test_a_supplied_key_may_have_64_characters(client, full):
    key = "k" * 64
    response = client.post(URL, json={"key": key, "name": "n"}, headers=full)
    assert response.status_code == 201, response.json
    assert response.get_json()["key"] == key
