"""Tests for qnopt.data: sklearn sets, the IDX parser, Fashion-MNIST loading, batching."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from qnopt import data as qdata
from qnopt.data.idx import IDXFormatError, parse_idx, read_idx, write_idx

FMNIST_DIR = Path(qdata.FASHION_MNIST_DEFAULT_PATH)


# ----------------------------------------------------------------------------- sklearn sets


def test_digits_shapes_and_ranges():
    ds = qdata.digits()
    assert isinstance(ds, qdata.Dataset) and ds.name == "digits"
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    for x in (ds.x_train, ds.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert ds.x_train.max() == 1.0  # 16/16 occurs
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_digits_split_is_seeded():
    a, b, c = qdata.digits(seed=0), qdata.digits(seed=0), qdata.digits(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert qdata.digits(test_fraction=0.5).x_test.shape[0] in (898, 899)


def test_breast_cancer_standardised_with_train_stats():
    ds = qdata.breast_cancer()
    assert ds.x_train.shape == (455, 30) and ds.x_test.shape == (114, 30)
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1.0, atol=1e-4)
    assert set(np.unique(ds.y_train)) == {0, 1}
    raw = qdata.breast_cancer(standardize=False)
    mean, std = raw.x_train.mean(0), raw.x_train.std(0)
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / std, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("loader, shape", [(qdata.wine, 13), (qdata.iris, 4)])
def test_small_tables(loader, shape):
    ds = loader()
    assert ds.x_train.shape[1] == shape and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-5)


# ----------------------------------------------------------------------------- IDX


def test_parse_hand_built_bytes():
    """The parser against bytes written by hand (independent of write_idx)."""
    buf = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes([0, 1, 2, 253, 254, 255])
    arr = parse_idx(buf)
    assert arr.dtype == np.uint8 and arr.shape == (2, 3)
    np.testing.assert_array_equal(arr, [[0, 1, 2], [253, 254, 255]])
    # big-endian int32 / float32
    buf = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 1, -2)
    np.testing.assert_array_equal(parse_idx(buf), [1, -2])
    buf = bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + struct.pack(">f", 1.5)
    assert parse_idx(buf)[0] == np.float32(1.5)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(5, 4, 3)) * 50).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", arr)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_idx_round_trip_labels_1d(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", labels)), labels)


def test_bad_magic(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(IDXFormatError, match="bad IDX magic"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00")  # unknown type code
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(p)


def test_truncated(tmp_path):
    good = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 3, 4) + bytes(12)
    p = tmp_path / "t"
    p.write_bytes(good[:-1])
    with pytest.raises(IDXFormatError, match="truncated.*12.*found 11"):
        read_idx(p)
    p.write_bytes(good[:6])  # inside the dims
    with pytest.raises(IDXFormatError, match="truncated"):
        read_idx(p)
    p.write_bytes(good[:2])
    with pytest.raises(IDXFormatError, match="truncated"):
        read_idx(p)
    p.write_bytes(good + b"\x00")
    with pytest.raises(IDXFormatError, match="trailing"):
        read_idx(p)
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx(gz)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _fake_fmnist(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, arr) in enumerate(arrays.items()):
        # mix raw and gzipped files when gz is True
        write_idx(directory / (name + (".gz" if gz and i % 2 == 0 else "")), arr)
    return arrays


def test_fashion_mnist_from_fake_files(tmp_path):
    arrays = _fake_fmnist(tmp_path)
    assert qdata.available_fashion_mnist(tmp_path)
    ds = qdata.fashion_mnist(tmp_path)
    assert ds.name == "fashion_mnist"
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(6, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_missing_file_message(tmp_path):
    missing = tmp_path / "nowhere"
    assert not qdata.available_fashion_mnist(missing)
    with pytest.raises(FileNotFoundError) as info:
        qdata.fashion_mnist(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "path=" in msg


def test_fashion_mnist_one_file_missing(tmp_path):
    _fake_fmnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert not qdata.available_fashion_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        qdata.fashion_mnist(tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    _fake_fmnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(IDXFormatError, match="labels"):
        qdata.fashion_mnist(tmp_path)


@pytest.mark.skipif(not qdata.available_fashion_mnist(), reason=f"no Fashion-MNIST in {FMNIST_DIR}")
def test_real_fashion_mnist():
    ds = qdata.fashion_mnist()
    assert ds.x_train.shape == (60000, 784) and ds.y_train.shape == (60000,)
    assert ds.x_test.shape == (10000, 784) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- batching


def test_batches_cover_a_permutation():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    got = list(qdata.batches(x, y, 3, 0))
    assert len(got) == 3 and all(xb.shape == (3, 1) for xb, _ in got)
    seen = np.concatenate([yb for _, yb in got])
    assert len(set(seen)) == 9
    for xb, yb in got:
        np.testing.assert_array_equal(xb[:, 0], yb)
    full = list(qdata.batches(x, y, 3, 0, drop_last=False))
    assert [len(yb) for _, yb in full] == [3, 3, 3, 1]
    assert sorted(np.concatenate([yb for _, yb in full])) == list(range(10))


def test_batches_seeding():
    import jax

    x, y = np.zeros((20, 2)), np.arange(20)
    order = lambda s: np.concatenate([yb for _, yb in qdata.batches(x, y, 5, s)])  # noqa: E731
    np.testing.assert_array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))
    np.testing.assert_array_equal(order(jax.random.key(1)), order(jax.random.key(1)))
    np.testing.assert_array_equal(order(jax.random.PRNGKey(1)), order(jax.random.PRNGKey(1)))
    assert not np.array_equal(order(jax.random.key(1)), order(jax.random.key(2)))
    with pytest.raises(ValueError):
        list(qdata.batches(x, y[:3], 5, 0))
