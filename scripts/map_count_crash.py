"""Reproduce the pytest-worker segfault in XLA's ``backend_compile_and_load`` in seconds.

The cause: each program XLA compiles for the CPU keeps ~9 memory mappings until it is freed; a
pytest-xdist worker of the qnopt suite compiles ~7,000 programs and nears the kernel's
``vm.max_map_count`` (65,530) at the end of the run; the next compilation that cannot map its
code segfaults. Instead of running the suite for 20 minutes, this fills the process's map table
with small anonymous mappings until only ``--headroom`` entries are left, then runs the given
tests in the same process (``pytest.main``), ``--runs`` times per configuration, each in a fresh
subprocess, and prints the crash count (a run ending by SIGSEGV) per configuration.

    python scripts/map_count_crash.py --runs 3 -- tests/methods/test_slimqn.py

Configurations: the headroom (no fill, or ``--headroom`` entries) × the conftest's guard (off,
or freeing compiled programs below ``--guard`` entries of headroom) × ``--opt-levels`` (XLA's
LLVM backend optimisation level). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import subprocess
import sys
import time


def _fill(headroom: int) -> None:
    """Create private anonymous one-page mappings, alternately read-only and read-write so that
    the kernel cannot merge neighbours, until ``headroom`` map entries are left."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    from qnopt.testing import memory_map_headroom   # imports jax; starts no backend

    prot_read, prot_rw, private_anonymous = 1, 3, 0x22
    n = 0
    while (left := memory_map_headroom()) > headroom:
        for _ in range(min(1000, left - headroom)):
            libc.mmap(None, 4096, prot_read if n % 2 else prot_rw, private_anonymous, -1, 0)
            n += 1


def _child(headroom: int, pytest_args: list[str]) -> int:
    import faulthandler

    faulthandler.enable()
    if headroom:
        _fill(headroom)
    import pytest

    return pytest.main(["-q", "-p", "no:cacheprovider", "-x", *pytest_args])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--headroom", type=int, default=6000, help="map entries left after the fill")
    parser.add_argument("--guard", type=int, default=4000,
                        help="QNOPT_TEST_MIN_MAP_HEADROOM of the guarded configuration")
    parser.add_argument("--opt-levels", default="0", help="comma-separated XLA backend optimisation levels")
    parser.add_argument("--child-headroom", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    if args.child_headroom is not None:
        sys.exit(_child(args.child_headroom, args.pytest_args))

    import jax
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, tests: {' '.join(args.pytest_args)}")
    print(f"{'fill (entries left)':>20} {'guard':>6} {'opt':>4} {'runs':>5} {'crashes':>8} {'other fail':>10} {'s/run':>6}")
    for headroom, guard, level in itertools.product([0, args.headroom], [0, args.guard],
                                                    args.opt_levels.split(",")):
        env = dict(os.environ, QNOPT_TEST_MIN_MAP_HEADROOM=str(guard),
                   XLA_FLAGS=f"--xla_backend_optimization_level={level}")
        crashes = failures = 0
        start = time.time()
        for _ in range(args.runs):
            rc = subprocess.run([sys.executable, __file__, "--child-headroom", str(headroom), "--",
                                 *args.pytest_args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL).returncode
            crashes += rc < 0
            failures += rc > 0
        per_run = (time.time() - start) / args.runs
        print(f"{headroom or 'none':>20} {guard or 'off':>6} {level:>4} {args.runs:>5} {crashes:>8} "
              f"{failures:>10} {per_run:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
