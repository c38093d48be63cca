#!/usr/bin/env bash
# Set up and run the whole qnopt test suite on a fresh machine (Python >= 3.11, pip, root).
# Installs Debian's Fashion-MNIST and fortunes packages (data of the tests and the benchmark's
# image problems and char LM) and the package with its test extras, then runs pytest on 2
# workers. Extra arguments go to pytest.
# pytest's options (pyproject.toml) end the run when a worker dies or a test hangs; the outer
# timeout (QNOPT_TEST_TIMEOUT, default 50 min; the suite takes ~20 on 2 cores) ends it whatever
# else goes wrong, with a message, inside CI's 90 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -d /usr/share/games/fortunes ] || missing+=(fortunes)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: ${missing[*]} not installed (apt-get install ${missing[*]}); their tests will be skipped" >&2
  fi
fi

python -m pip install -q -e ".[test,bench]"
# One on-disk compilation cache for this run, shared by both workers: the suite's tiny programs
# spend most of their time compiling, the same program is often compiled by both workers and
# again after a worker frees its compiled programs (tests/conftest.py); a hit loads it instead
# (tests/capture: 186 -> 154 s). A fresh, empty directory each run, removed at exit.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d -t qnopt-jax-cache.XXXXXX)"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
limit="${QNOPT_TEST_TIMEOUT:-50m}"
status=0
timeout --kill-after=60 "$limit" python -m pytest -q -n 2 -rf --durations=30 "$@" || status=$?
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "error: the test suite ran past $limit and was stopped (a hung test, or a deadlocked pytest-xdist scheduler;" \
       "a hung test shows the stacks faulthandler printed above)" >&2
fi
exit "$status"
