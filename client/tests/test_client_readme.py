"""The client's README: its Python blocks, run in order as one program, against the live
server (its address for ``http://127.0.0.1:8000``, a real key for ``"ak_..."``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
GRANTS = ["sessions:create", "sessions:read", "sessions:update", "events:create", "events:append"]


def test_the_readme_examples_run(live, admin, make_key, tmp_path):
    program = "\n".join(BLOCK.findall(README.read_text()))
    assert 'KEY = "ak_..."' in program and "http://127.0.0.1:8000" in program
    if "support-bot" not in {agent.key for agent in admin.agents.list(limit=100)}:
        admin.agents.create("support-bot", name="Support")
    token = make_key({"support-bot": GRANTS})
    program = program.replace('KEY = "ak_..."', f"KEY = {token!r}")
    program = program.replace("http://127.0.0.1:8000", live.url)
    ran = subprocess.run(
        [sys.executable, "-W", "error", "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert "Invoice INV-9 was sent on Monday." in lines  # the newest-first answers
    assert "404 session_not_found " in ran.stdout
    assert sum(line.endswith(" input_message") for line in lines) == 1  # the async session's
