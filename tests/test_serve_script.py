"""scripts/serve, as a newcomer runs it: the key it prints works, for sessions and history,
and nothing warns about the SQLite it installs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import requests

from tests.servers import ROOT, free_port


def test_the_printed_curl_line_and_key_create_a_session_and_write_its_history(tmp_path):
    bind = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "AGENT_SESSIONS_BIND": bind,
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/serve.db",
        "AGENT_SESSIONS_WORKERS": "2",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [str(ROOT / "scripts" / "serve")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text()
            if "Listening at" in text:
                break
            assert serve.poll() is None, text
            time.sleep(0.2)
        else:
            raise AssertionError(log.read_text())
        curl = re.search(r"  (curl .*?)\n\n", text, re.S)
        assert curl is not None, text
        created = subprocess.run(
            ["bash", "-c", curl.group(1)], capture_output=True, text=True, timeout=30
        )
        session = json.loads(created.stdout)
        assert session["agent_key"] == "demo-agent", created.stdout
        key = re.search(r"API key \(shown once\): (\S+)", text).group(1)
        url = f"http://{bind}/v2/agents/demo-agent/sessions/{session['key']}/events"
        said = requests.post(
            url,
            json={"type": "input_message", "messages": [{"type": "text", "content": "Hi"}]},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert said.status_code == 201, said.text
        replied = requests.post(
            url + "/batch",
            json={"events": [{"type": "agent_output", "content": "Hello"}]},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert replied.status_code == 201, replied.text
        listed = requests.get(url, headers={"x-api-key": key}, timeout=10).json()
        assert [e["type"] for e in listed["events"]] == ["input_message", "agent_output"]
        text = log.read_text()
        assert "unknown setting" not in text
        # The default install's SQLite, as the server reports it, needs no warning.
        version = re.search(r"storage: SQLite (\d+)\.(\d+)\.(\d+)", text)
        assert version is not None, text
        assert tuple(map(int, version.groups())) >= (3, 51, 3), text
        assert "walresetbug" not in text and "WAL-reset" not in text, text
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
