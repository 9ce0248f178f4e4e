"""deploy/nginx/agent-sessions.conf through a real nginx, in front of a live gunicorn.

The recipe is rendered into a temporary prefix: its ports moved to free ones on
127.0.0.1, its upstream pointed at the test's gunicorn, its logs and
certificate paths into the prefix (a self-signed certificate made with
openssl), and its head and body timeouts shortened from 10 s to 2 s. nginx runs
as an unprivileged user (nobody, when the suite runs as root). Clients connect
from other loopback addresses (127.0.0.2 and up) than the one nginx connects
to gunicorn from, so the two are told apart in the logs.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from config import Config
from sessions_app.console import signin
from sessions_app.serving.server import HEADER_TIMEOUT
from tests.conftest import IN_CI
from tests.servers import ROOT, Server, bootstrap, free_port, serving
from tests.test_console import field
from tests.test_gunicorn import assert_error

RECIPE = ROOT / "deploy" / "nginx" / "agent-sessions.conf"
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")
SHORT_TIMEOUT = 2  # seconds, for client_header_timeout and client_body_timeout
AGENT = "bot"
# The project's access-log format, and the X-Forwarded-For header as gunicorn received it.
ACCESS_LOG_FORMAT = (
    '%(h)s %(l)s - %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s" '
    "request_id=%({x-request-id}o)s duration=%(L)ss forwarded_for=%({x-forwarded-for}i)s"
)


def tool_or_skip(path: str, package: str) -> str:
    found = shutil.which(path)
    if found:
        return found
    message = f"{path} is not installed"
    if IN_CI:
        pytest.fail(f"{message}; .ci/run installs it")
    pytest.skip(f"{message}; `apt-get install {package}` to run this test")


def directive(name: str) -> str:
    """The value of the recipe's one ``name`` directive."""
    found = re.findall(rf"^\s*{re.escape(name)}\s+([^;]*);", RECIPE.read_text(), re.M)
    assert len(found) == 1, (name, found)
    return found[0].strip()


def seconds(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


def test_the_recipe_matches_the_service_settings() -> None:
    gunicorn_conf = (ROOT / "gunicorn.conf.py").read_text()
    gunicorn_timeout = int(re.search(r'"AGENT_SESSIONS_TIMEOUT", (\d+)', gunicorn_conf).group(1))
    gunicorn_keepalive = int(re.search(r"^keepalive = (\d+)$", gunicorn_conf, re.M).group(1))
    size = directive("client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * 2**20 == Config.EVENTS_MAX_CONTENT_LENGTH
    largest = max(Config.MAX_CONTENT_LENGTH, Config.EVENT_MAX_BYTES)
    assert Config.EVENTS_MAX_CONTENT_LENGTH >= largest
    assert seconds(directive("client_header_timeout")) == HEADER_TIMEOUT
    assert seconds(directive("proxy_read_timeout")) < gunicorn_timeout
    upstream = re.search(r"upstream agent_sessions \{(.*?)\}", RECIPE.read_text(), re.S).group(1)
    idle = re.search(r"keepalive_timeout (\S+);", upstream).group(1)
    assert seconds(idle) < gunicorn_keepalive
    assert directive("proxy_request_buffering") == "on"
    assert directive("proxy_buffering") == "on"
    assert directive("proxy_set_header X-Forwarded-For") == "$remote_addr"
    assert directive("proxy_set_header X-Forwarded-Proto") == "$scheme"
    assert directive("proxy_http_version") == "1.1"
    assert RECIPE.read_text().count("# REPLACE") == 4


@dataclass
class Front:
    """nginx on ``https_port`` and ``http_port`` before gunicorn ``server``."""

    server: Server
    token: str
    prefix: Path
    https_port: int
    http_port: int
    cert: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def access_log(self) -> str:
        return (self.prefix / "agent-sessions.access.log").read_text(errors="replace")

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def connect(self, source: str = "127.0.0.2", rcvbuf: int | None = None) -> ssl.SSLSocket:
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.bind((source, 0))
        raw.settimeout(10)
        raw.connect(("127.0.0.1", self.https_port))
        return self.tls().wrap_socket(raw, server_hostname="127.0.0.1")

    def request(self, method: str, path: str, headers=(), body=None, source="127.0.0.2"):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.https_port, context=self.tls(), source_address=(source, 0), timeout=10
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers))
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def render(prefix: Path, upstream: int, https_port: int, http_port: int) -> str:
    text = RECIPE.read_text()
    for old, new in [
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:80;\n", ""),
        ("listen [::]:443 ssl;\n", ""),
        ("/var/log/nginx/", f"{prefix}/"),
        ("/etc/ssl/agent-sessions/", f"{prefix}/"),
        ("client_header_timeout 10s;", f"client_header_timeout {SHORT_TIMEOUT}s;"),
        ("client_body_timeout 10s;", f"client_body_timeout {SHORT_TIMEOUT}s;"),
    ]:
        assert old in text, f"the recipe no longer has {old!r}: update this test"
        text = text.replace(old, new)
    return text


def main_conf(prefix: Path) -> str:
    temp = " ".join(
        f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    return f"""pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    {temp} uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    include {prefix}/agent-sessions.conf;
}}
"""


@contextlib.contextmanager
def nginx_before(server: Server, token: str) -> Iterator[Front]:
    nginx = tool_or_skip(NGINX, "nginx")
    openssl = tool_or_skip("openssl", "openssl")
    prefix = Path(tempfile.mkdtemp(prefix="agent-sessions-nginx-"))
    try:
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
            + ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
            + ["-addext", "subjectAltName=IP:127.0.0.1"]
            + ["-keyout", str(prefix / "privkey.pem"), "-out", str(prefix / "fullchain.pem")],
            check=True,
            capture_output=True,
            timeout=60,
        )
        https_port, http_port = free_port(), free_port()
        (prefix / "agent-sessions.conf").write_text(
            render(prefix, server.port, https_port, http_port)
        )
        (prefix / "nginx.conf").write_text(main_conf(prefix))
        user = {}
        if os.geteuid() == 0:  # nginx itself runs unprivileged
            nobody = pwd.getpwnam("nobody")
            for path in [prefix, *prefix.iterdir()]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid}
        command = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log")]
        command += ["-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
        checked = subprocess.run(
            [*command, "-t"], capture_output=True, text=True, timeout=30, **user
        )
        assert checked.returncode == 0, checked.stderr
        with open(prefix / "stderr.log", "wb") as stderr:
            process = subprocess.Popen(command, stdout=stderr, stderr=stderr, **user)
        try:
            deadline = time.monotonic() + 10
            while not port_open(https_port):
                assert process.poll() is None, (prefix / "stderr.log").read_text()
                assert time.monotonic() < deadline, "nginx did not come up"
                time.sleep(0.05)
            yield Front(server, token, prefix, https_port, http_port, prefix / "fullchain.pem")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def connections_to(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (gunicorn's side of them)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port
    return count


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tool_or_skip(NGINX, "nginx")  # before a server starts for nothing
    tool_or_skip("openssl", "openssl")
    tmp = tmp_path_factory.mktemp("nginx")
    env = {
        "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp}/sessions.db",
        "AGENT_SESSIONS_PROXY_COUNT": "1",
        "AGENT_SESSIONS_METRICS_TOKEN": "metrics-token-0123456789",
        "AGENT_SESSIONS_WORKERS": "1",
        # Pages of 80 large events (20 MB), past what any socket buffer holds.
        "AGENT_SESSIONS_EVENTS_PAGE_MAX_BYTES": str(32 * 2**20),
    }
    grants = f"{AGENT}=sessions:create,sessions:read,events:create,events:append"
    token = bootstrap(env, AGENT, grants=grants)
    extra = ["--access-logformat", ACCESS_LOG_FORMAT]
    with serving(env, tmp, workers=1, extra=extra) as server, nginx_before(server, token) as front:
        yield front


def gunicorn_lines(front: Front, marker: str) -> list[str]:
    return [line for line in front.server.logs().splitlines() if marker in line]


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_client_address_reaches_the_service_and_a_spoofed_one_does_not(front: Front) -> None:
    spoofed = {
        "x-api-key": front.token,
        "X-Request-ID": "through-nginx-1",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "http",
    }
    status, _, body = front.request("GET", f"/v2/agents/{AGENT}/sessions", spoofed)
    assert status == 200, body
    wait_for(lambda: gunicorn_lines(front, "request_id=through-nginx-1"))
    (line,) = gunicorn_lines(front, "request_id=through-nginx-1")
    # gunicorn's %(h)s is the address ProxyFix took from the one hop it trusts.
    assert line.startswith("127.0.0.2 - - ["), line
    assert line.endswith("forwarded_for=127.0.0.2"), line
    assert "203.0.113.9" not in line
    (proxied,) = [x for x in front.access_log().splitlines() if "through-nginx-1" in x]
    assert proxied.startswith("127.0.0.2 - - [") and '"GET /v2/agents/bot/sessions HTTP' in proxied


def test_a_body_over_the_largest_bound_is_413_from_nginx(front: Front) -> None:
    bound = Config.EVENTS_MAX_CONTENT_LENGTH
    path = f"/v2/agents/{AGENT}/sessions/nginx-413/events/batch"
    headers = {"x-api-key": front.token, "Content-Type": "application/json"}
    # Declared: answered at once, before any of the body is sent.
    with front.connect() as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {bound + 1}\r\n"
        sock.sendall(head.encode() + f"x-api-key: {front.token}\r\n\r\n".encode())
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413
        assert json.loads(answer.read())["error"] == "payload_too_large"
    # Chunked: cut once past the bound.
    chunks = (b"x" * 65536 for _ in range(bound // 65536 + 1))
    response = requests.post(
        front.url + path, data=chunks, headers=headers, verify=str(front.cert), timeout=30
    )
    assert_error(response, 413, "payload_too_large")
    assert response.headers["Server"] == "nginx"
    assert not gunicorn_lines(front, "nginx-413")
    # At the bound, the body reaches the service (which answers its own 404).
    response = requests.post(
        front.url + path, data=b" " * bound, headers=headers, verify=str(front.cert), timeout=30
    )
    assert_error(response, 404, "session_not_found")
    wait_for(lambda: len(gunicorn_lines(front, "nginx-413")) == 1)


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_slow_client_is_cut_by_nginx_without_reaching_gunicorn(front: Front, part: str) -> None:
    # Ten clients, each past gunicorn's 64 KiB a thread would read, and more than its 4
    # threads: one byte of a head each, or a whole head and 10 bytes of its body.
    path = f"/v2/agents/{AGENT}/sessions/slow-{part}/events/batch"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"x-api-key: {front.token}\r\nContent-Length: 100000\r\n\r\n"
    sent = head[:1].encode() if part == "head" else head.encode() + b"[" * 10
    before = connections_to(front.server.port)
    started = time.monotonic()
    clients = [front.connect(source="127.0.0.5") for _ in range(10)]
    try:
        for sock in clients:
            sock.sendall(sent)
        time.sleep(SHORT_TIMEOUT / 2)
        assert connections_to(front.server.port) <= before
        healthz = requests.get(front.url + "/healthz", verify=str(front.cert), timeout=2)
        assert healthz.status_code == 200
        for sock in clients:
            try:
                assert sock.recv(1) == b""  # closed by nginx, with nothing sent
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < SHORT_TIMEOUT + 3
    finally:
        for sock in clients:
            sock.close()
    assert not gunicorn_lines(front, f"slow-{part}")


def test_a_client_that_never_reads_a_large_answer_holds_no_thread(front: Front) -> None:
    headers = {"x-api-key": front.token}
    sessions = f"{front.server.url}/v2/agents/{AGENT}/sessions"
    session = {"key": "large", "name": "large"}
    created = requests.post(sessions, json=session, headers=headers, timeout=10)
    assert created.status_code == 201, created.text
    event = {"type": "agent_output", "content": "x" * 250_000}
    for _ in range(5):  # 80 events: a page of 20 MB, beyond what socket buffers hold
        batch = requests.post(
            f"{sessions}/large/events/batch",
            json={"events": [event] * 16},
            headers=headers,
            timeout=30,
        )
        assert batch.status_code == 201, batch.text
    path = f"/v2/agents/{AGENT}/sessions/large/events?limit=100"
    # Five clients (gunicorn has four threads) that ask and never read.
    clients = [front.connect(source="127.0.0.6", rcvbuf=4096) for _ in range(5)]
    try:
        for i, sock in enumerate(clients):
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {front.token}\r\n"
                f"X-Request-ID: never-read-{i}\r\n\r\n".encode()
            )
        # Each answer was sent whole to nginx: gunicorn logs a request once it is.
        wait_for(lambda: len(gunicorn_lines(front, "never-read-")) == 5, timeout=30)
        assert all(" 200 " in line for line in gunicorn_lines(front, "never-read-"))
        started = time.monotonic()
        healthz = requests.get(front.url + "/healthz", verify=str(front.cert), timeout=5)
        assert healthz.status_code == 200 and time.monotonic() - started < 1
        # The clients' answers are still there for them, whole.
        clients[0].settimeout(10)
        answer = http.client.HTTPResponse(clients[0])
        answer.begin()
        assert answer.status == 200 and len(json.loads(answer.read())["events"]) == 80
    finally:
        for sock in clients:
            sock.close()


def test_metrics_are_not_reachable_through_it(front: Front) -> None:
    auth = {"Authorization": "Bearer metrics-token-0123456789"}
    direct = requests.get(front.server.url + "/metrics", headers=auth, timeout=5)
    assert direct.status_code == 200  # served by gunicorn, to a scraper on its address
    for path in ("/metrics", "/metrics?x=1", "//metrics", "/%6Detrics", "/metrics/", "/./metrics"):
        status, headers, body = front.request("GET", path, auth)
        assert status == 404, (path, status)
        assert json.loads(body)["error"] == "not_found"
        assert headers["X-Request-ID"] and headers["Server"] == "nginx"
    # Plain HTTP proxies nothing: it sends browsers to HTTPS.
    plain = requests.get(
        f"http://127.0.0.1:{front.http_port}/metrics", allow_redirects=False, timeout=5
    )
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
    assert len(gunicorn_lines(front, "etrics")) == 1  # the direct scrape only


def test_the_console_cookie_is_secure_through_it(front: Front) -> None:
    browser = requests.Session()
    # What a client says of the scheme is overwritten (or dropped) by nginx.
    browser.headers.update({"X-Forwarded-Proto": "http", "X-Forwarded-Ssl": "off"})
    page = browser.get(front.url + "/console/", verify=str(front.cert), timeout=5)
    assert page.status_code == 200
    login = page.headers["Set-Cookie"]
    assert login.startswith(signin.LOGIN_COOKIE + "=") and "; Secure" in login
    form = {"api_key": front.token, "login_token": field(page.text, "login_token")}
    signed = browser.post(
        front.url + "/console/login",
        data=form,
        allow_redirects=False,
        verify=str(front.cert),
        timeout=5,
    )
    assert signed.status_code == 303
    cookie = next(
        c for c in signed.raw.headers.getlist("Set-Cookie") if c.startswith(signin.COOKIE + "=")
    )
    assert "; Secure" in cookie and "HttpOnly" in cookie
    # Straight to gunicorn over plain HTTP, the same page's cookie is not Secure.
    direct = requests.get(front.server.url + "/console/", timeout=5)
    assert "Secure" not in direct.headers["Set-Cookie"]


def test_connections_per_address_are_bounded(front: Front) -> None:
    cap = int(re.search(r"limit_conn agent_sessions_per_address (\d+);", RECIPE.read_text())[1])
    head = f"POST /v2/agents/{AGENT}/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{"
    held = [front.connect(source="127.0.0.7") for _ in range(cap)]
    try:
        for sock in held:
            sock.sendall(head.encode())  # a head in, a body under way: counted
        time.sleep(0.2)
        status, headers, body = front.request("GET", "/healthz", source="127.0.0.7")
        assert status == 429 and json.loads(body)["error"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "1"
        status, _, _ = front.request("GET", "/healthz", source="127.0.0.8")
        assert status == 200  # another address is served
    finally:
        for sock in held:
            sock.close()
