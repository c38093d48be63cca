"""The aliases' docstring examples run (each is a small training loop that must converge)."""

import doctest

import pytest

import qnopt.alias


@pytest.mark.slow  # ~60 s of CPU (17 jitted training loops); the aliases themselves run in the common matrix
def test_alias_examples():
    result = doctest.testmod(qnopt.alias, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
