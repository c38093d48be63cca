"""Data loading for qnopt's tests and benchmarks (nothing is ever downloaded).

* :func:`digits` – scikit-learn's bundled 8x8 digits, pixels in [0, 1].
* :func:`fashion_mnist` – Fashion-MNIST from local IDX files
  (``apt-get install dataset-fashion-mnist``), pixels in [0, 1].
* :func:`breast_cancer`, :func:`wine`, :func:`iris` – small standardised tables.
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

__all__ = [
    "FASHION_MNIST_DEFAULT_PATH",
    "FASHION_MNIST_FILES",
    "Dataset",
    "IDXFormatError",
    "available_fashion_mnist",
    "batches",
    "breast_cancer",
    "digits",
    "fashion_mnist",
    "iris",
    "read_idx",
    "standardize",
    "wine",
    "write_idx",
]
