"""Data loading for qnopt's tests and benchmarks (nothing is ever downloaded).

* :func:`digits` – scikit-learn's bundled 8x8 digits, pixels in [0, 1].
* :func:`fashion_mnist` – Fashion-MNIST from local IDX files
  (``apt-get install dataset-fashion-mnist``), pixels in [0, 1].
* :func:`breast_cancer`, :func:`wine`, :func:`iris` – small standardised tables.
* :func:`fortunes` – character-level language-model windows of Debian's ``fortunes`` text
  (``apt-get install fortunes``), with its :class:`CharVocab`.
* :func:`batches` – shuffled numpy minibatches.
* :func:`read_idx` / :func:`write_idx` – the IDX file format.
"""

from qnopt.data.batching import batches
from qnopt.data.datasets import (
    FASHION_MNIST_DEFAULT_PATH,
    FASHION_MNIST_FILES,
    Dataset,
    available_fashion_mnist,
    breast_cancer,
    digits,
    fashion_mnist,
    iris,
    standardize,
    wine,
)
from qnopt.data.idx import IDXFormatError, read_idx, write_idx
from qnopt.data.text import (
    FORTUNES_DEFAULT_PATH,
    CharVocab,
    available_fortunes,
    char_windows,
    fortune_files,
    fortunes,
    read_fortunes,
)

__all__ = [
    "FASHION_MNIST_DEFAULT_PATH",
    "FASHION_MNIST_FILES",
    "FORTUNES_DEFAULT_PATH",
    "CharVocab",
    "Dataset",
    "IDXFormatError",
    "available_fashion_mnist",
    "available_fortunes",
    "batches",
    "breast_cancer",
    "char_windows",
    "digits",
    "fashion_mnist",
    "fortune_files",
    "fortunes",
    "iris",
    "read_fortunes",
    "read_idx",
    "standardize",
    "wine",
    "write_idx",
]
