"""The runner's handling of a child's output: straight to its log file when quiet, pumped in chunks
(complete lines prefixed on the terminal, a partial line kept for the next chunk) when echoing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shop_mesh.mesh.runner import Child

# Output in pieces: a line split across writes, several lines in one write, no final newline.
SCRIPT = (
    "import sys, time\n"
    "w = sys.stdout.write\n"
    "w('first\\nsec'); sys.stdout.flush(); time.sleep(0.05)\n"
    "w('ond\\nthird\\nfourth\\n'); sys.stdout.flush(); time.sleep(0.05)\n"
    "sys.stderr.write('to stderr\\n'); sys.stderr.flush()\n"
    "w('no newline'); sys.stdout.flush()\n"
    "sys.exit(3)\n"
)
EXPECTED_LOG = "first\nsecond\nthird\nfourth\nto stderr\nno newline"


async def _run(tmp_path: Path, echo: bool, stopping: bool = False) -> Child:
    child = Child("demo", [sys.executable, "-c", SCRIPT], {}, tmp_path, echo)
    child.stopping = stopping
    await child.start()
    assert child.proc is not None
    await child.proc.wait()
    assert child._pump is not None
    await child._pump
    return child


async def test_echo_prefixes_whole_lines_and_logs_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    child = await _run(tmp_path, echo=True)
    out = capsys.readouterr().out.splitlines()
    prefix = f"{'demo':>16} | "
    assert [line for line in out if line.startswith(prefix)] == [
        prefix + text for text in EXPECTED_LOG.split("\n")
    ]
    assert "demo exited unexpectedly (code 3)" in out[-1]
    assert child.log_path.read_text() == EXPECTED_LOG
    assert child.last_lines(2) == "to stderr / no newline"


async def test_quiet_child_writes_its_log_directly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "demo.log").write_text("earlier run\n")
    child = await _run(tmp_path, echo=False)
    out = capsys.readouterr().out
    assert child.proc is not None and child.proc.stdout is None  # no pipe: the runner reads nothing
    assert "demo |" not in out
    assert "demo exited unexpectedly (code 3)" in out
    assert child.log_path.read_text() == "earlier run\n" + EXPECTED_LOG


async def test_a_stop_that_was_asked_for_is_not_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _run(tmp_path, echo=False, stopping=True)
    assert "exited unexpectedly" not in capsys.readouterr().out


async def test_echo_stops_on_a_closed_terminal_but_the_log_keeps_filling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stdout", Closed())
    child = await _run(tmp_path, echo=True, stopping=True)
    assert child.echo is False
    assert child.log_path.read_text() == EXPECTED_LOG
