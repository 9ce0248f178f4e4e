"""Lists read page after page by following ``page_key``, sync and async."""

from __future__ import annotations

from agent_sessions_client import Page


def test_sessions_are_read_across_pages(api, agent):
    keys = [f"s{i:02}" for i in range(23)]
    for key in keys:
        api.sessions.create(agent, key=key, name=f"Session {key}")

    pages = list(api.sessions.list(agent, limit=10).pages())
    assert all(isinstance(page, Page) for page in pages)
    assert [len(page.items) for page in pages] == [10, 10, 3]
    assert [page.page_key is None for page in pages] == [False, False, True]
    assert [s.key for page in pages for s in page.items] == keys
    assert [s.key for s in api.sessions.list(agent, limit=10)] == keys

    # Where another process left off: from a page_key.
    rest = api.sessions.list(agent, limit=10, page_key=pages[0].page_key)
    assert [s.key for s in rest] == keys[10:]
    filtered = api.sessions.list(agent, limit=3, filter="Session s1[0-4]")
    assert [s.key for s in filtered] == keys[10:15]


def test_events_are_read_across_pages_in_either_order(api, agent):
    api.sessions.create(agent, key="long", name="Long")
    written = api.events.append(
        agent, "long", [{"type": "agent_output", "content": f"part {i}"} for i in range(25)]
    )
    ids = [event.id for event in written]

    pages = list(api.events.list(agent, "long", limit=10).pages())
    assert [len(page.items) for page in pages] == [10, 10, 5]
    assert [event.id for page in pages for event in page.items] == ids
    newest_first = api.events.list(agent, "long", order="desc", limit=7)
    assert [event.id for event in newest_first] == ids[::-1]
    desc_pages = list(api.events.list(agent, "long", order="desc", limit=7).pages())
    resumed = api.events.list(agent, "long", order="desc", limit=7, page_key=desc_pages[1].page_key)
    assert [event.id for event in resumed] == ids[::-1][14:]
    assert [e.content for e in api.events.list(agent, "long", limit=100)][-1] == "part 24"
