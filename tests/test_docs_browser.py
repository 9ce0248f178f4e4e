"""The docs page in a real headless Chromium, from a live gunicorn server, offline.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe``
(JSON messages on file descriptors 3 and 4), which needs no client library and
reports every request, response, failure and script error of the page. Host
names other than 127.0.0.1 do not resolve, so anything the page fetched from
elsewhere (a CDN) would show up as a failed request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.servers import serving

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 30.0


def chromium_or_skip() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    message = f"Chromium is not installed at {CHROMIUM}"
    if IN_CI:
        pytest.fail(f"{message}; .ci/run installs it")
    pytest.skip(f"{message}; `apt-get install chromium` to run this test")


# Moves two descriptors to 3 and 4, then runs the browser (the shell cannot name fds above 9).
_ON_FDS_3_AND_4 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


class Browser:
    """A headless Chromium and one page, over the DevTools protocol."""

    def __init__(self, executable: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # The browser reads commands on fd 3 and writes answers and events on fd 4.
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ON_FDS_3_AND_4, str(to_browser_r), str(from_browser_w)]
            + [executable, *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.events: list[dict[str, Any]] = []
        self._answers: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buffer = b""
        with open(self._from_browser, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                with self._changed:
                    for raw in messages:
                        message = json.loads(raw)
                        if "id" in message:
                            self._answers[message["id"]] = message
                        else:
                            self.events.append(message)
                    self._changed.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, **extra: Any) -> Any:
        with self._changed:
            self._next_id += 1
            ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}, **extra}
        if self.session and "sessionId" not in extra and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._changed:
            if not self._changed.wait_for(lambda: ident in self._answers, timeout=TIMEOUT):
                raise TimeoutError(f"no answer to {method}")
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def open(self, url: str) -> None:
        """Attach to a new page, record its network and console, and navigate to ``url``."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Network.setCacheDisabled", {"cacheDisabled": True})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def wait_for(self, expression: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression}")
            time.sleep(0.1)

    def wait_until_idle(self, quiet: float = 0.5) -> None:
        """Until no request has been pending for ``quiet`` seconds."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pending = self.pending()
            time.sleep(quiet)
            if not pending and not self.pending():
                return
        raise TimeoutError(f"requests still pending: {self.pending()}")

    def pending(self) -> set[str]:
        with self._changed:
            events = list(self.events)
        sent = {
            e["params"]["requestId"] for e in events if e["method"] == "Network.requestWillBeSent"
        }
        done = {
            e["params"]["requestId"]
            for e in events
            if e["method"] in ("Network.loadingFinished", "Network.loadingFailed")
        }
        return sent - done

    def of(self, method: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e["params"] for e in self.events if e["method"] == method]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self._to_browser)
        self._reader.join(timeout=10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    browser = Browser(chromium_or_skip(), tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.close()


@pytest.mark.slow
def test_docs_page_renders_the_api_offline(browser: Browser, tmp_path: Path) -> None:
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/docs.db"}
    with serving(env, tmp_path, workers=1) as server:
        # The deep link opens the create-session operation, examples included.
        browser.open(f"{server.url}/v2/docs#/Sessions/create_session")
        browser.wait_for(
            "!!document.querySelector('#operations-Sessions-create_session .body-param__example')"
        )
        browser.wait_until_idle()
        dom = browser.evaluate("document.documentElement.outerHTML")
        title = browser.evaluate("document.querySelector('.info .title').textContent")

    requests = browser.of("Network.requestWillBeSent")
    urls = [r["request"]["url"] for r in requests]
    assert f"{server.url}/v2/openapi.json" in urls
    assert f"{server.url}/v2/docs/swagger-ui-bundle.js" in urls
    elsewhere = [u for u in urls if not u.startswith((server.url + "/", "data:"))]
    assert not elsewhere, f"requests to other origins: {elsewhere}"
    failed = [(r["requestId"], r.get("errorText")) for r in browser.of("Network.loadingFailed")]
    assert not failed, f"failed requests: {failed}"
    bad = [
        (r["response"]["url"], r["response"]["status"])
        for r in browser.of("Network.responseReceived")
    ]
    assert all(status < 400 for _, status in bad), bad
    errors = [e["exceptionDetails"] for e in browser.of("Runtime.exceptionThrown")]
    assert not errors, errors
    logged = [e["entry"] for e in browser.of("Log.entryAdded") if e["entry"]["level"] == "error"]
    assert not logged, logged  # CSP violations and failed loads end up here

    assert title.startswith("Agent Sessions API")
    block = dom.index('id="operations-Sessions-create_session"')
    assert "opblock-post" in dom[block - 200 : block]
    assert 'data-path="/v2/agents/{agent_key}/sessions"' in dom[block:]
    assert "Create a session" in dom[block:]
    assert "user_12345_session" in dom[block:]  # the request example
    for operation in ("list_sessions", "get_session", "update_session", "delete_session"):
        assert f'id="operations-Sessions-{operation}"' in dom
