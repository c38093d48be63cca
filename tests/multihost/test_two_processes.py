"""Multi-host: two processes on CPU (``jax.distributed.initialize`` with a local coordinator, gloo
collectives), the batch and K-FAC's stacked factor work split over their 4 devices, give the
single-process trajectory (issue 17, item 5). Each process is a subprocess with a deadline, so a
hung collective fails the test instead of hanging the suite."""

import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("worker.py")
DEADLINE = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(args: list, tmp_path) -> list:
    procs = [subprocess.Popen([sys.executable, str(WORKER), *a], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path) for a in args]
    outs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=DEADLINE)
            outs.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the processes did not finish within {DEADLINE} s (a hung collective?)")
    for code, out in outs:
        assert code == 0, out[-3000:]
    return outs


def test_two_processes_match_one(tmp_path):
    port = str(_free_port())
    _run([["0", port, str(tmp_path / "two.npz")], ["1", port, "-"]], tmp_path)
    _run([["single", "0", str(tmp_path / "one.npz")]], tmp_path)
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(two.files) == sorted(one.files) and len(one.files) == 8
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=2e-4, atol=2e-5, err_msg=name)
    assert any(np.abs(one[name]).max() > 0 for name in one.files)
