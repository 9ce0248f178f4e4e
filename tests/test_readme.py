"""README.md, pasted in order into one shell and one Python, against a live server.

The convention for every fenced block in README.md (follow it in new sections):

- A block runs unless the line just before its opening fence is
  ``<!-- not run: REASON -->``, with the reason (it starts a server, names a
  production host's paths, is Prometheus' or a sample of output...). An
  unmarked block in any language but ``sh`` and ``python`` fails the test.
- ``sh`` blocks run in README order in one bash (``set -euo pipefail``), as
  one terminal at the clone's root with the server up: variables and functions
  carry over from block to block, and every ``$NAME`` must be set by an
  earlier line (scripts/serve sets nothing in that shell). ``python`` blocks
  run, interleaved with them in README order, in one Python interpreter
  started from that shell: what the shell exported is in ``os.environ``, and
  names carry over from block to block.
- ``127.0.0.1:8000`` is replaced by the test server's address; nothing else.
- Every ``curl`` must answer 2xx, unless a comment after it (before the next
  ``curl``) starts with the status it answers: ``# 204``, ``# 304 while
  unchanged``, ``# 200, or 412 if it changed``. The test reads each answer's
  status from a header dump of its own, so a README ``curl`` takes no ``-D``.
- The table of contents at the top lists every ``##`` and ``###`` heading, in
  order, linked to its anchor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.servers import BIN, ROOT, serving

README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->")
RUNS = ("sh", "python")
COMMENT = re.compile(r"(?:^|\s)#(.*)$")
CURL = re.compile(r"(?:^|[\s;|&(])curl\s")
STATUS = re.compile(r"\s*(\d{3})\b((?:\s*,?\s*or\s+\d{3}\b)*)")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the reason given, for a block marked not run

    @property
    def name(self) -> str:
        return f"README.md block at line {self.line} ({self.lang or 'no language'})"


def blocks(text: str) -> list[Block]:
    """Every fenced block, with the marker on the line before its fence."""
    found: list[Block] = []
    lines = text.split("\n")
    start = None
    for number, line in enumerate(lines):
        if not line.lstrip().startswith("```"):
            continue
        if start is None:
            start = number
            continue
        marker = NOT_RUN.fullmatch(lines[start - 1].strip()) if start else None
        found.append(
            Block(
                lang=lines[start].strip()[3:].strip(),
                code=textwrap.dedent("\n".join(lines[start + 1 : number])) + "\n",
                line=start + 1,
                not_run=marker.group(1) if marker else None,
            )
        )
        start = None
    assert start is None, f"README.md: the block at line {start + 1} is never closed"
    return found


def to_run() -> list[Block]:
    return [block for block in blocks(README.read_text()) if block.not_run is None]


def code_only(line: str) -> str:
    return COMMENT.sub("", line)


def expected_statuses(code: str) -> list[set[int] | None]:
    """For each curl in the block, in order: the statuses its comment names, or None (2xx)."""
    lines = code.split("\n")
    starts = [n for n, line in enumerate(lines) for _ in CURL.finditer(code_only(line))]
    expected: list[set[int] | None] = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        statuses = None
        # A curl's own line, then the lines up to the next curl's.
        for line in lines[start : max(end, start + 1)]:
            comment = COMMENT.search(line)
            said = STATUS.match(comment.group(1)) if comment else None
            if said:
                statuses = {int(s) for s in re.findall(r"\d{3}", said.group(0))}
                break
        expected.append(statuses)
    return expected


def heading_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_every_block_runs_or_says_why_it_does_not() -> None:
    text = README.read_text()
    found = blocks(text)
    assert len(found) >= 10
    for block in found:
        if block.not_run is None:
            assert block.lang in RUNS, f"{block.name}: runs only sh or python; mark it not run"
    # A marker is only ever the line before a fence, with a reason.
    for number, line in enumerate(text.split("\n")):
        if "not run" in line and line.strip().startswith("<!--"):
            assert NOT_RUN.fullmatch(line.strip()), f"README.md line {number + 1}: {line!r}"
            assert any(block.line == number + 2 for block in found), (
                f"README.md line {number + 1}: a marker not right before a fence"
            )
    run = [block.lang for block in found if block.not_run is None]
    assert run.count("sh") >= 5 and run.count("python") >= 2, run


def test_status_comments_are_read_as_the_readme_writes_them() -> None:
    code = (
        "curl -s $A \\\n     -d '{}'\n# 201, Location: /x\n"
        "curl -s $A/x                 # 200: read\n"
        "TAG=$(curl -si $A | grep -i '^etag:')\n"
        "curl -s -X PATCH $A  # 200, or 412 if it changed\n"
        "curl -s -X DELETE $A\n# the same command again: 404\n"
        "curl -s $A -d @- <<EOF\n{}\nEOF\n# 409; then 201\n"
    )
    assert expected_statuses(code) == [{201}, {200}, None, {200, 412}, None, {409}]


def test_every_variable_is_set_before_a_block_uses_it() -> None:
    """A fresh shell has none of them: each comes from an earlier line or block."""
    defined: set[str] = set()
    exported: set[str] = set()
    for block in to_run():
        if block.lang == "python":
            for name in re.findall(r"os\.environ\[\"(\w+)\"\]", block.code):
                assert name in exported, f"{block.name}: {name} is not exported by the shell"
            continue
        for number, line in enumerate(block.code.split("\n"), block.line + 1):
            code = code_only(line)
            assert not re.search(r"^\s*agent-sessions ", code), "not on a fresh shell's PATH"
            assert not re.search(r"\s(-D|--dump-header)\b", code), "the test dumps the headers"
            used = set(re.findall(r"\$\{?(\w+)", code))
            assigned = set(re.findall(r"(?:^|\s|export\s)(\w+)=", code))
            assert used <= defined | assigned, f"README.md line {number}: {used - defined}"
            defined |= assigned | set(re.findall(r"^(\w+)\(\)", code))
            exported |= set(re.findall(r"^export (\w+)", code))


def test_the_table_of_contents_lists_every_heading_in_order() -> None:
    text = README.read_text()
    outside_blocks = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    headings = re.findall(r"^(##+) (.+)$", outside_blocks, re.M)
    wanted = [
        f"{'  ' * (len(hashes) - 2)}- [{title}](#{heading_anchor(title)})"
        for hashes, title in headings
        if len(hashes) <= 3
    ]
    toc = re.search(r"^## Contents\n\n((?:[ ]*- .*\n)+)", text, re.M)
    assert toc is not None, "README.md has no table of contents"
    assert wanted[0] == "- [Contents](#contents)"
    assert toc.group(1).rstrip("\n").split("\n") == wanted[1:]


class Repl:
    """A shell or a Python, fed one block at a time; each block's output in a file of its own."""

    def __init__(self, argv: list[str], env: dict[str, str], tmp: Path, prelude: str = ""):
        self.tmp = tmp
        self.log = open(tmp / f"{Path(argv[0]).name}.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.send(prelude)

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def wait(self, done: Path, out: Path, what: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while not done.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = out.read_text() if out.exists() else ""
                raise AssertionError(f"{what} failed:\n{output}")
            time.sleep(0.05)
        return out.read_text()

    def close(self) -> None:
        """End it, and whatever a block started in its process group (a server, say)."""
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
                time.sleep(0.5)
        self.process.wait(timeout=10)
        self.log.close()


# curl as a README line calls it, but with a timeout and each answer's status
# taken from a header dump into $CURL_STATUSES ("none" when nothing answered).
SHELL_PRELUDE = r"""set -euo pipefail
curl() {
  local head rc=0 status
  head=$(mktemp)
  command curl --max-time 10 -D "$head" "$@" || rc=$?
  status=$(sed -n 's/^HTTP\/[^ ]* \([0-9][0-9][0-9]\).*/\1/p' "$head" | tail -n 1)
  echo "${status:-none}" >> "$CURL_STATUSES"
  rm -f "$head"
  echo
  return "$rc"
}
"""

PYTHON_RUNNER = r"""
import contextlib, json, os, sys, traceback
namespace = {"__name__": "__main__"}
while line := sys.stdin.readline():
    job = json.loads(line)
    os.environ.update(job["env"])
    with open(job["out"], "w") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        try:
            exec(compile(job["code"], job["name"], "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
    open(job["done"], "w").close()
"""


def exported_env(path: Path) -> dict[str, str]:
    pairs = (item.partition("=") for item in path.read_text().split("\0") if "=" in item)
    return {name: value for name, _, value in pairs}


@pytest.mark.slow
def test_the_readme_runs_in_order_against_a_live_server(tmp_path: Path) -> None:
    env = {**os.environ, "AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/readme.db"}
    with serving(env, tmp_path, workers=2) as server:
        address = f"127.0.0.1:{server.port}"
        shell = Repl(["bash"], env, tmp_path, SHELL_PRELUDE)
        python = Repl([str(BIN / "python"), "-c", PYTHON_RUNNER], env, tmp_path)
        outputs: list[str] = []
        try:
            exported = env
            for n, block in enumerate(to_run()):
                code = block.code.replace("127.0.0.1:8000", address)
                out, done = tmp_path / f"{n}.out", tmp_path / f"{n}.done"
                if block.lang == "python":
                    job = {"code": code, "name": block.name, "env": exported}
                    python.send(json.dumps(job | {"out": str(out), "done": str(done)}) + "\n")
                    outputs.append(python.wait(done, out, block.name))
                    continue
                script, statuses = tmp_path / f"{n}.sh", tmp_path / f"{n}.statuses"
                script.write_text(code)
                statuses.touch()
                env_file = tmp_path / f"{n}.env"
                shell.send(
                    f"CURL_STATUSES={statuses}\n"
                    f"source {script} </dev/null >{out} 2>&1\n"
                    f"env -0 >{env_file}\n: >{done}\n"
                )
                output = shell.wait(done, out, block.name)
                outputs.append(output)
                exported = exported_env(env_file)
                answered = statuses.read_text().split()
                expected = expected_statuses(block.code)
                assert len(answered) == len(expected), (block.name, answered, output)
                for i, (got, want) in enumerate(zip(answered, expected, strict=True)):
                    ok = int(got) in want if want else got.startswith("2")
                    assert ok, f"{block.name}: curl {i + 1} answered {got}, not {want}:\n{output}"
        finally:
            shell.close()
            python.close()

        key = exported["KEY"]
        assert key.startswith("ak_")
        everything = "\n".join(outputs).replace(" ", "")
        assert '"key":"billing-question"' in everything
        assert "304" in outputs[run_index("If-None-Match")].split()
        assert outputs[run_index('name="Shipping question"')].split() == ["shipping-question"]
        streamed = outputs[run_index("create_stream")].split()
        assert streamed[:2] == ["input_message", "end"], streamed
        # The compaction hid the four events before the last question.
        history = requests.get(
            f"{server.url}/v2/agents/support-bot/sessions/billing-question/events",
            params={"include_hidden": "true", "limit": 100},
            headers={"x-api-key": key},
            timeout=10,
        ).json()["events"]
        hidden = [e["type"] for e in history if e.get("hide_reason") == "compaction"]
        assert hidden == ["input_message", "tool_input", "tool_output", "agent_output"], history
        assert [e["type"] for e in history].count("compaction") == 1


def run_index(needle: str) -> int:
    """The position, among the blocks run, of the one block that holds ``needle``."""
    found = [n for n, block in enumerate(to_run()) if needle in block.code]
    assert len(found) == 1, (needle, found)
    return found[0]
