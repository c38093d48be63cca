"""The aliases' docstring examples run (each is a small training loop that must converge). The
aliases live next to their transformations (qnopt/methods/<method>.py); only their own
docstrings are run here."""

import doctest

import pytest

from qnopt.alias import ALIASES


@pytest.mark.slow  # ~60 s of CPU (17 jitted training loops); the aliases themselves run in the common matrix
def test_alias_examples():
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(verbose=False)
    for alias in ALIASES:
        for test in finder.find(alias, f"qnopt.{alias.__name__}", globs={}):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
