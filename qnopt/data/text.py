"""Character-level language-model data from plain text (nothing is downloaded).

The benchmark's text is Debian's ``fortunes`` package (``apt-get install fortunes``): plain-text
files in ``/usr/share/games/fortunes``, one quotation or joke per *entry*, entries separated by lines
holding a single ``%``. Next to each file lie its index ``<name>.dat`` and a ``<name>.u8`` link to
it; neither is text to read.

* :func:`read_fortunes` -- the entries of a fortune file or of every fortune file in a directory.
* :class:`CharVocab` -- a sorted character vocabulary (``encode`` / ``decode``).
* :func:`char_windows` -- non-overlapping windows of ``context + 1`` characters as inputs
  ``chars[:-1]`` and next-character targets ``chars[1:]``.
* :func:`fortunes` -- all of it: a :class:`~qnopt.data.Dataset` of windows, split by entry, and its
  vocabulary.

Example:
  >>> vocab = CharVocab.from_text("hello")
  >>> vocab.chars, vocab.encode("hole").tolist()
  ('ehlo', [1, 3, 2, 0])
  >>> x, y = char_windows(vocab.encode("hellohello"), context=4)
  >>> vocab.decode(x[0]), vocab.decode(y[0]), x.shape
  ('hell', 'ello', (2, 4))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qnopt.data.datasets import Dataset

__all__ = [
    "FORTUNES_DEFAULT_PATH",
    "CharVocab",
    "available_fortunes",
    "char_windows",
    "fortune_files",
    "fortunes",
    "read_fortunes",
]

#: Where Debian's ``fortunes`` package puts its files.
FORTUNES_DEFAULT_PATH = "/usr/share/games/fortunes"

#: Suffixes of the files next to the fortune texts that are not text: the index and the link.
_NOT_TEXT = (".dat", ".u8")


def _resolve(path: str | os.PathLike | None) -> Path:
    return Path(FORTUNES_DEFAULT_PATH if path is None else path)


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} {path} not found. Install the text with `apt-get install fortunes` (Debian/Ubuntu; "
        f"it fills {FORTUNES_DEFAULT_PATH}), or pass path= pointing at a plain-text file or a "
        "directory of them (entries separated by lines holding '%'). qnopt never downloads data.")


def fortune_files(path: str | os.PathLike | None = None, names: Sequence[str] | None = None) -> list[Path]:
    """The fortune text files at ``path``: the file itself, or a directory's files (sorted by name).

    A directory's text files are its regular files that are no symbolic link and do not end in
    ``.dat`` or ``.u8``; subdirectories are not read.

    Args:
      path: a file or a directory (default ``/usr/share/games/fortunes``).
      names: only these file names inside the directory, in this order.

    Raises:
      FileNotFoundError: ``path`` (or one of ``names``) does not exist, or the directory holds no
        text file; the message says how to get the data.
    """
    path = _resolve(path)
    if path.is_file():
        if names is not None:
            raise ValueError(f"names= selects files inside a directory; {path} is a file")
        return [path]
    if not path.is_dir():
        raise _missing(path, "Fortune file or directory")
    if names is not None:
        files = [path / name for name in names]
        for f in files:
            if not f.is_file():
                raise _missing(f, "Fortune file")
        return files
    files = [p for p in sorted(path.iterdir())
             if p.is_file() and not p.is_symlink() and not p.name.endswith(_NOT_TEXT)]
    if not files:
        raise _missing(path / "*", "Fortune text file")
    return files


def available_fortunes(path: str | os.PathLike | None = None) -> bool:
    """Whether :func:`fortune_files` finds text at ``path`` (only checks that files exist)."""
    try:
        return bool(fortune_files(path))
    except FileNotFoundError:
        return False


def read_fortunes(path: str | os.PathLike | None = None, names: Sequence[str] | None = None) -> list[str]:
    """The entries of the fortune files at ``path`` (see :func:`fortune_files`), in file order.

    An entry is the text between two separator lines (a line holding only ``%``), with its final
    newline; empty entries are dropped. Files are read as UTF-8 (undecodable bytes become U+FFFD).
    """
    entries: list[str] = []
    for f in fortune_files(path, names):
        entry: list[str] = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            if line.strip() == "%":
                entries.append("".join(entry))
                entry = []
            else:
                entry.append(line)
        entries.append("".join(entry))
    return [e for e in entries if e.strip()]


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: token ``i`` is ``chars[i]``, the characters sorted.

    Attributes:
      chars: the distinct characters, sorted (so the same text always gives the same ids).
    """

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The sorted distinct characters of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        """Number of tokens."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as int32 token ids; a character outside the vocabulary raises ``KeyError``."""
        index = {c: i for i, c in enumerate(self.chars)}
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The characters of token ids."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).ravel())


def char_windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into non-overlapping windows of ``context + 1`` tokens (the tail is dropped).

    Returns:
      ``(inputs, targets)``, both int32 ``(n, context)``: ``inputs = window[:-1]``,
      ``targets = window[1:]``, so ``targets[i, t]`` is the token after ``inputs[i, t]``.
    """
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    ids = np.asarray(ids, np.int32)
    n = len(ids) // (context + 1)
    w = ids[: n * (context + 1)].reshape(n, context + 1)
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


def fortunes(path: str | os.PathLike | None = None, *, names: Sequence[str] | None = None,
             context: int = 48, test_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, CharVocab]:
    """Next-character prediction windows of the fortune entries at ``path``.

    The entries (:func:`read_fortunes`) are split at random into training and test entries
    (``test_fraction`` of them, at least one each, seeded); each split's entries are joined in
    file order and cut by :func:`char_windows`. The vocabulary is that of all the entries, so every
    test character has a token. Nothing is downloaded.

    Args:
      path: a fortune file or a directory of them (default ``/usr/share/games/fortunes``).
      names: only these files of the directory.
      context: tokens per window (the model's sequence length).
      test_fraction: share of the entries held out for testing, in ``(0, 1)``.
      seed: the split's seed.

    Returns:
      ``(dataset, vocab)``: ``dataset.x_*`` / ``dataset.y_*`` are int32 ``(n, context)`` inputs and
      targets, ``dataset.name`` is ``"fortunes"``.

    Raises:
      FileNotFoundError: no text at ``path`` (the message says ``apt-get install fortunes``).
      ValueError: fewer than two entries, or a split too short for one window.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    entries = read_fortunes(path, names)
    if len(entries) < 2:
        raise ValueError(f"need at least two fortune entries to split, found {len(entries)} at {_resolve(path)}")
    vocab = CharVocab.from_text("".join(entries))
    n_test = min(len(entries) - 1, max(1, round(test_fraction * len(entries))))
    is_test = np.zeros(len(entries), bool)
    is_test[np.random.default_rng(seed).permutation(len(entries))[:n_test]] = True

    def windows(test: bool) -> tuple[np.ndarray, np.ndarray]:
        text = "".join(e for e, t in zip(entries, is_test) if t == test)
        x, y = char_windows(vocab.encode(text), context)
        if len(x) == 0:
            raise ValueError(f"the {'test' if test else 'training'} text ({len(text)} characters) is "
                             f"shorter than one window of {context + 1}; lower context= or add text")
        return x, y

    (x_train, y_train), (x_test, y_test) = windows(False), windows(True)
    return Dataset(x_train, y_train, x_test, y_test, "fortunes"), vocab
