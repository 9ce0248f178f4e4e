"""Stand-in for ``agent-sessions sessions export`` where the CLI lacks it: a history as JSON Lines.

Usage: ``export_events.py STORAGE_URL AGENT_KEY SESSION_KEY``. Writes one line
per event, oldest first, read through ``Storage.iter_events`` (a batch at a
time), then an end line with the count, as the CLI's export does; what
``bench/run.py --export`` measures is the same read and the same writing.
"""

from __future__ import annotations

import json
import sys

from storage_backends import storage_from_url
from storage_backends.codec import format_ts, utcnow


def main(url: str, agent_key: str, session_key: str) -> None:
    storage = storage_from_url(url)
    out = sys.stdout
    count = 0
    for event in storage.iter_events(agent_key=agent_key, session_key=session_key, now=utcnow()):
        line = {"id": event.id, "type": event.type, "created_at": format_ts(event.created_at)}
        if event.hide_reason:
            line["hide_reason"] = event.hide_reason
        out.write(json.dumps(line | event.fields, separators=(",", ":")) + "\n")
        count += 1
    out.write(json.dumps({"end": {"events": count}}) + "\n")
    out.flush()
    storage.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
