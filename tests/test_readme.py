"""The README's walkthrough, pasted into a fresh shell, against a live server.

Every block marked ``<!-- walkthrough -->`` runs in order: the shell blocks in
one bash (as one terminal session), then the Python ones, with the server's
address in place of ``127.0.0.1:8000`` and the key the shell made in place of
``"ak_..."``. curl fails on any HTTP error here, so a line that answers 4xx
fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.servers import BIN, ROOT, serving

MARKED = re.compile(r"<!-- walkthrough -->\n```(\w+)\n(.*?)```", re.S)


def walkthrough() -> list[tuple[str, str]]:
    blocks = MARKED.findall((ROOT / "README.md").read_text())
    assert [kind for kind, _ in blocks] == ["sh", "sh", "python"], blocks
    return blocks


def test_every_walkthrough_line_has_what_it_needs() -> None:
    """Nothing a fresh shell lacks: the CLI by its path in the clone, every variable set first."""
    shell = "\n".join(code for kind, code in walkthrough() if kind == "sh")
    assert not re.search(r"^agent-sessions ", shell, re.M)  # not on a fresh shell's PATH
    defined = set(re.findall(r"^(\w+)=", shell, re.M))
    assert set(re.findall(r"\$(\w+)", shell)) <= defined


@pytest.mark.slow
def test_readme_walkthrough_runs_against_a_live_server(tmp_path: Path) -> None:
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/readme.db"}
    blocks = walkthrough()
    with serving(env, tmp_path, workers=2) as server:
        address = f"127.0.0.1:{server.port}"
        shell = "\n".join(code for kind, code in blocks if kind == "sh")
        script = (
            "set -euo pipefail\n"
            'curl() { command curl --fail-with-body --max-time 10 "$@"; echo; }\n'
            + shell.replace("127.0.0.1:8000", address)
            + '\nprintf %s "$KEY" > "$KEY_FILE"\n'
        )
        key_file = tmp_path / "key"
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=ROOT,
            env={**os.environ, **env, "KEY_FILE": str(key_file)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert '"key":"billing-question"' in result.stdout.replace(" ", ""), result.stdout
        assert '"enabled":false' in result.stdout.replace(" ", "")
        key = key_file.read_text()
        assert key.startswith("ak_")

        python = "\n".join(code for kind, code in blocks if kind == "python")
        assert 'KEY = "ak_..."' in python
        program = python.replace('KEY = "ak_..."', "import os\nKEY = os.environ['KEY']").replace(
            "127.0.0.1:8000", address
        )
        ran = subprocess.run(
            [str(BIN / "python"), "-c", program],
            cwd=tmp_path,
            env={**os.environ, "KEY": key},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        # The filter finds the session whatever the case: "(?i)billing" matches "Billing".
        assert ran.stdout.split() == ["billing-question"], ran.stdout
