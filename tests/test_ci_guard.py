"""The suite's own pytest options (pyproject.toml, ``-n 2`` as in scripts/test.sh) end a run whose
worker dies or whose test hangs, fast, non-zero, naming the test and keeping its traceback.

A scratch suite of two files runs in a subprocess: one test kills its own process
(``os.abort()``, as the segfault in XLA's compiler did), or sleeps forever. Before these options,
a dead worker under ``--dist loadgroup`` was replaced, its finished work units were re-queued as
empty ones and the run hung (pytest-xdist 3.8) until CI's limit."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _scratch(tmp_path: Path, body: str) -> None:
    (tmp_path / "test_crash.py").write_text(textwrap.dedent(f"""
        import os, time
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_fine(i):
            time.sleep(0.2)

        def test_dies():
            time.sleep(0.5)
            {body}
        """))
    (tmp_path / "test_other.py").write_text(textwrap.dedent("""
        import time
        import pytest

        @pytest.mark.parametrize("i", range(8))
        def test_other(i):
            time.sleep(0.3)
        """))


def _run(tmp_path: Path, *options: str, bound: float):
    """Run the scratch suite with the project's options and ``-n 2``; kill it all past ``bound``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    cmd = [sys.executable, "-m", "pytest", "-c", str(PYPROJECT), "--rootdir", str(tmp_path), "-q",
           "-p", "no:cacheprovider", "-n", "2", *options, "test_crash.py", "test_other.py"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the run did not end within {bound:.0f} s:\n{out}")
    return proc.returncode, out, time.monotonic() - start


def test_a_crashed_worker_fails_the_run_fast_and_names_the_test(tmp_path):
    _scratch(tmp_path, "os.abort()")
    rc, out, elapsed = _run(tmp_path, bound=120)
    assert rc != 0, out
    assert "crashed while running 'test_crash.py::test_dies'" in out, out
    assert "Fatal Python error: Aborted" in out and "in test_dies" in out, out   # faulthandler's traceback
    assert elapsed < 120


def test_a_hung_test_fails_the_run_with_its_stack(tmp_path):
    """The same mechanism as the suite's 540 s / 600 s, at 3 s / 6 s."""
    _scratch(tmp_path, "time.sleep(3600)")
    rc, out, elapsed = _run(tmp_path, "-o", "timeout=6", "-o", "faulthandler_timeout=3", bound=120)
    assert rc != 0, out
    assert "crashed while running 'test_crash.py::test_dies'" in out, out
    assert "Timeout (0:00:03)!" in out and "in test_dies" in out, out   # every thread's stack
    assert elapsed < 120


def test_the_suite_options_are_the_ones_checked():
    """The options exercised above are the ones the suite runs with."""
    text = PYPROJECT.read_text()
    for option in ("--max-worker-restart=0", "--dist loadgroup", "timeout = 600", 'timeout_method = "thread"',
                   "faulthandler_timeout = 540"):
        assert option in text, option
    assert "-n 2" in (PYPROJECT.parent / "scripts" / "test.sh").read_text()
