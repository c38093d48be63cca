"""Test-wide setup (before JAX starts).

* Eight simulated CPU devices for the sharding checks.
* LLVM's backend optimisation off: the suite's tiny programs spend most of their time compiling,
  and ``--xla_backend_optimization_level=0`` cuts the suite's CPU time by a quarter (user time
  37.8 → 28.5 min, wall 20 → 15 min on 2 cores). The HLO is the same; the machine code differs,
  so results move by float32 round-off, which every comparison of two compiled programs must
  tolerate anyway. A user's own ``XLA_FLAGS`` setting of it wins.
* Compiled programs freed when the process runs short of memory mappings
  (:func:`qnopt.testing.release_compiled_programs`, after every test). Without it a pytest-xdist
  worker accumulates ~7,000 compiled programs of ~9 mappings each, reaches the kernel's
  ``vm.max_map_count`` (65,530) near the end of the run, and dies with a segmentation fault in
  XLA's ``backend_compile_and_load`` (``scripts/map_count_crash.py`` reproduces it in seconds).
* Hypothesis derandomized: every run draws the same examples (no example database survives a
  fresh clone, so random draws made CI pass or fail by chance). Counter-examples found while
  exploring are kept as ``@example``s. ``HYPOTHESIS_PROFILE=explore`` draws fresh examples.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import qnopt.testing  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# QNOPT_TEST_MIN_MAP_HEADROOM: the headroom below which compiled programs are freed (0 turns it
# off; scripts/map_count_crash.py sets it to show the crash with and without).
_MIN_MAP_HEADROOM = int(os.environ.get("QNOPT_TEST_MIN_MAP_HEADROOM", 16384))


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """After each test, free JAX's compiled programs if the process runs short of mappings."""
    yield
    if _MIN_MAP_HEADROOM:
        qnopt.testing.release_compiled_programs(_MIN_MAP_HEADROOM)


@pytest.fixture
def x64():
    """float64 for the test (dense float64 references), restored afterwards."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
