"""Small classification data sets used by tests and benchmarks.

Nothing here downloads anything: the scikit-learn sets ship inside the
scikit-learn wheel, and Fashion-MNIST is read from local IDX files (Debian's
``dataset-fashion-mnist`` package installs them in
``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qnopt.data.idx import IDXFormatError, read_idx

__all__ = [
    "Dataset",
    "FASHION_MNIST_DEFAULT_PATH",
    "FASHION_MNIST_FILES",
    "available_fashion_mnist",
    "breast_cancer",
    "digits",
    "fashion_mnist",
    "iris",
    "standardize",
    "wine",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"

#: Base names of the four IDX files; each may also carry a ``.gz`` suffix.
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class Dataset(NamedTuple):
    """A train/test split. ``x_*`` are float32 ``(n, features)``, ``y_*`` int32 ``(n,)``
    (:func:`qnopt.data.fortunes`: int32 token windows ``(n, context)`` in both)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


# ----------------------------------------------------------------------------- helpers


def _split(
    x: np.ndarray, y: np.ndarray, name: str, test_fraction: float, seed: int
) -> Dataset:
    """Stratified, seeded train/test split with dtype normalisation."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.ascontiguousarray(y_tr, dtype=np.int32),
        np.ascontiguousarray(x_te, dtype=np.float32),
        np.ascontiguousarray(y_te, dtype=np.int32),
        name,
    )


def standardize(ds: Dataset, eps: float = 1e-8) -> Dataset:
    """Centre and scale features with the *training-set* mean and std.

    Constant features (std < ``eps``) are only centred.
    """
    mean = ds.x_train.mean(axis=0, dtype=np.float64)
    std = ds.x_train.std(axis=0, dtype=np.float64)
    std = np.where(std < eps, 1.0, std)
    f = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return ds._replace(x_train=f(ds.x_train), x_test=f(ds.x_test))


def _sklearn_table(loader_name: str, name: str, standardize_: bool, test_fraction: float, seed: int) -> Dataset:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader_name)()
    ds = _split(bunch.data, bunch.target, name, test_fraction, seed)
    return standardize(ds) if standardize_ else ds


# ----------------------------------------------------------------------------- sklearn sets


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    Pixels are scaled from 0..16 to [0, 1] and flattened to 64 features.
    With the default ``test_fraction`` the split is 1437 train / 360 test,
    stratified by class.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    return _split(x, bunch.target, "digits", test_fraction, seed)


def breast_cancer(standardize: bool = True, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Wisconsin breast-cancer data (569 samples, 30 features, binary labels).

    With ``standardize`` the features are standardised with the training-set
    mean/std. Split is 455 train / 114 test by default.
    """
    return _sklearn_table("load_breast_cancer", "breast_cancer", standardize, test_fraction, seed)


def wine(standardize: bool = True, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """UCI wine data (178 samples, 13 features, 3 classes), optionally standardised."""
    return _sklearn_table("load_wine", "wine", standardize, test_fraction, seed)


def iris(standardize: bool = True, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Fisher's iris data (150 samples, 4 features, 3 classes), optionally standardised."""
    return _sklearn_table("load_iris", "iris", standardize, test_fraction, seed)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _resolve_path(path: str | os.PathLike | None) -> Path:
    return Path(FASHION_MNIST_DEFAULT_PATH if path is None else path)


def _find_idx(directory: Path, base: str) -> Path | None:
    """Return ``directory/base`` or ``directory/base.gz``, whichever exists."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def available_fashion_mnist(path: str | os.PathLike | None = None) -> bool:
    """Whether all four Fashion-MNIST IDX files exist (raw or ``.gz``) under ``path``.

    Only checks existence; it does not parse the files.
    """
    directory = _resolve_path(path)
    return all(_find_idx(directory, base) is not None for base in FASHION_MNIST_FILES.values())


def fashion_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST (60000 train / 10000 test, 28x28 grey-scale, 10 classes).

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally
    gzipped as ``<name>.gz``) from ``path``, by default
    ``/usr/share/datasets/fashion-mnist``. Nothing is downloaded.

    Returns:
      A :class:`Dataset` with images flattened to 784 float32 features in
      [0, 1] and int32 labels.

    Raises:
      FileNotFoundError: a file is missing; the message names the path and how
        to get the data.
      IDXFormatError: a file is corrupt, or images and labels disagree.
    """
    directory = _resolve_path(path)
    arrays: dict[str, np.ndarray] = {}
    for field, base in FASHION_MNIST_FILES.items():
        found = _find_idx(directory, base)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {directory / base}[.gz] not found. "
                "Install the data with `apt-get install dataset-fashion-mnist` "
                "(Debian/Ubuntu), or pass path= pointing at a directory holding "
                f"{', '.join(FASHION_MNIST_FILES.values())} (optionally .gz). "
                "qnopt never downloads data."
            )
        arrays[field] = read_idx(found)

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise IDXFormatError(f"Fashion-MNIST {split} images have shape {x.shape}, expected (n, 28, 28)")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise IDXFormatError(
                f"Fashion-MNIST {split}: {x.shape[0]} images but labels of shape {y.shape}"
            )

    def images(a: np.ndarray) -> np.ndarray:
        return (a.reshape(a.shape[0], -1).astype(np.float32) / np.float32(255.0))

    return Dataset(
        images(arrays["x_train"]),
        arrays["y_train"].astype(np.int32),
        images(arrays["x_test"]),
        arrays["y_test"].astype(np.int32),
        "fashion_mnist",
    )
