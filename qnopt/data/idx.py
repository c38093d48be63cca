"""Reader and writer for the IDX binary format used by (Fashion-)MNIST.

An IDX file is laid out as::

    byte 0-1   zero
    byte 2     element type code (0x08 uint8, 0x09 int8, 0x0B int16,
               0x0C int32, 0x0D float32, 0x0E float64)
    byte 3     number of dimensions ``ndim``
    ndim * 4   dimension sizes, unsigned 32-bit big-endian
    ...        the data, row-major, big-endian

Files may be gzip-compressed; compression is detected from the gzip magic
bytes, not from the file name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDXFormatError", "IDX_DTYPES", "read_idx", "write_idx", "parse_idx"]

#: IDX element type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """Raised when a file is not a well-formed IDX file (bad magic, truncated, ...)."""


def parse_idx(buf: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX byte string into a numpy array.

    Args:
      buf: the raw (already decompressed) file contents.
      source: a name for the data, used in error messages.

    Returns:
      An array of the file's shape in native byte order.

    Raises:
      IDXFormatError: bad magic number, unknown type code, or a data section
        that is shorter or longer than the header announces.
    """
    if len(buf) < 4:
        raise IDXFormatError(
            f"{source}: truncated IDX file: {len(buf)} bytes, the header alone needs 4"
        )
    zero0, zero1, type_code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_DTYPES:
        raise IDXFormatError(
            f"{source}: bad IDX magic number 0x{buf[:4].hex()} (expected 0x0000TTNN "
            f"with type code TT in {{{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}}})"
        )
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise IDXFormatError(
            f"{source}: truncated IDX file: header announces {ndim} dimensions "
            f"({header_len} header bytes) but the file has only {len(buf)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", buf[4:header_len]) if ndim else ()
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(buf) - header_len
    if found < expected:
        raise IDXFormatError(
            f"{source}: truncated IDX file: shape {tuple(dims)} of {dtype.name} needs "
            f"{expected} data bytes, found {found}"
        )
    if found > expected:
        raise IDXFormatError(
            f"{source}: {found - expected} unexpected trailing bytes after the data "
            f"of shape {tuple(dims)}"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      IDXFormatError: if the file is not valid IDX (or a corrupt gzip stream).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise IDXFormatError(f"{path}: corrupt or truncated gzip stream: {e}") from e
    return parse_idx(raw, source=str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (inverse of :func:`read_idx`).

    Args:
      path: destination.
      array: any array whose dtype is one of the IDX element types
        (uint8, int8, int16, int32, float32, float64).
      compress: gzip the output; defaults to ``True`` iff ``path`` ends in ``.gz``.

    Returns:
      The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    code = next(
        (c for c, dt in IDX_DTYPES.items() if dt.newbyteorder("=") == array.dtype.newbyteorder("=")),
        None,
    )
    if code is None:
        raise TypeError(f"dtype {array.dtype} has no IDX type code")
    if array.ndim > 255:
        raise ValueError("IDX supports at most 255 dimensions")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path
