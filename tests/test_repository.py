"""What the repository must not hold: a path of a build machine or a pointer to a file that is not
part of the project (our internal planning notes). Citations name the paper itself (authors, title,
venue or arXiv id, section / algorithm / equation)."""

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join([
    r"\b(?:METHODS|DEVELOPERS|ARCHITECTURE)" + r"\.md\b",      # planning notes outside the project
    "/" + "work/",                                             # the build machine's work tree
    r"shared" + "/papers",                                      # its folder of paper texts
    r"\.\./" + "shared",
    r"[a-z0-9-]+-(?:thesis|practical|structured|momentumized|minibatch)-[a-z0-9-]+" + r"\.(?:md|txt)\b",
]))


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):     # not a git checkout (an sdist)
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [REPO / n for n in names if (REPO / n).is_file()]


def test_no_machine_paths_or_outside_files_are_named():
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()[:120]}")
    assert not hits, "cite the paper (authors, title, venue, section), not a file:\n" + "\n".join(hits)


@pytest.mark.parametrize("line", [
    "see " + "METHODS" + ".md for the rules",
    "python3 -m venv /" + "work/venvs/x",
    "Ren thesis (" + "ren-thesis-kbfgs-tnt-smw" + ".md), §5",
])
def test_the_pattern_catches_what_it_is_for(line):
    assert FORBIDDEN.search(line)
