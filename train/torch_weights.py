"""Read a legacy (non-zip) PyTorch state-dict file into numpy arrays, without torch.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names. This reader
only lets the pickle name the four globals a plain state dict needs (an OrderedDict, tensor
rebuilding and two storage types) and refuses everything else, so a file that tries to call
`os.system` fails before anything runs.

Legacy layout: pickled magic number, protocol version, sys info, the object (storages are
persistent ids), the list of storage keys, then for each key an int64 element count followed by
the raw little-endian data.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SUPPORTED_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a plain state dict does not need."""


class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only carries the dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _LazyTensor:
    """A tensor whose storage bytes come later in the file."""

    def __init__(self, storage_key: str, offset: int, size: tuple, stride: tuple) -> None:
        self.storage_key, self.offset, self.size, self.stride = storage_key, offset, size, stride


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return _LazyTensor(storage, offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: BinaryIO, storages: dict[str, _StorageType]) -> None:
        super().__init__(fh)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> str:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        self._storages[key] = storage_type
        return key


def _safe_load(fh: BinaryIO) -> Any:
    """Unpickle a small header value with no globals allowed at all."""
    return _RestrictedUnpickler(fh, {}).load()


def check_view(name: str, offset: Any, size: Any, stride: Any, numel: int, path: str | Path = "") -> None:
    """Refuse a tensor view that would read outside its storage (as_strided does not check).

    Every element a view can reach is offset + sum(i_k * stride_k) for 0 <= i_k < size_k; with
    non-negative strides its largest is offset + sum((size_k - 1) * stride_k), which must be
    below the storage's element count. Negative strides, negative offsets and sizes, and
    non-integers are refused outright: a plain state dict never has them.
    """
    where = f"{path}: entry {name!r}"
    values = (offset, *size, *stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: offset, size and stride must be integers")
    if len(size) != len(stride):
        raise ValueError(f"{where}: {len(size)} sizes but {len(stride)} strides")
    if offset < 0 or any(v < 0 for v in size) or any(v < 0 for v in stride):
        raise ValueError(f"{where}: negative offset, size or stride")
    if any(v == 0 for v in size):
        if offset > numel:
            raise ValueError(f"{where}: offset {offset} is past the end of its storage ({numel} elements)")
        return  # an empty tensor reads nothing
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= numel:
        raise ValueError(
            f"{where}: reads element {last} of a storage of {numel} elements (offset {offset}, "
            f"size {tuple(size)}, stride {tuple(stride)}); the file is damaged or hostile"
        )


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the state dict in `path` as {name: float/int numpy array}, shapes as in torch."""
    data = Path(path).read_bytes()
    fh = io.BytesIO(data)
    if _safe_load(fh) != LEGACY_MAGIC:
        raise ValueError(f"{path}: not a legacy PyTorch file (zip-format files are not supported)")
    if _safe_load(fh) != SUPPORTED_PROTOCOL:
        raise ValueError(f"{path}: unsupported PyTorch protocol version")
    sys_info = _safe_load(fh)
    if not sys_info.get("little_endian", False):
        raise ValueError(f"{path}: big-endian files are not supported")

    storages: dict[str, _StorageType] = {}
    obj = _RestrictedUnpickler(fh, storages).load()
    keys = _safe_load(fh)
    blobs: dict[str, np.ndarray] = {}
    for key in keys:
        storage_type = storages.get(key)
        if storage_type is None:
            raise ValueError(f"{path}: storage {key!r} is listed but never described")
        header = fh.read(8)
        if len(header) != 8:
            raise ValueError(f"{path}: truncated (storage {key})")
        (count,) = struct.unpack("<q", header)
        if count < 0:
            raise ValueError(f"{path}: storage {key} has a negative element count")
        nbytes = count * storage_type.dtype.itemsize
        raw = fh.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{path}: truncated (storage {key})")
        blobs[key] = np.frombuffer(raw, dtype=storage_type.dtype)

    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, tensor in obj.items():
        if not isinstance(tensor, _LazyTensor):
            raise ValueError(f"{path}: entry {name!r} is not a tensor")
        blob = blobs.get(tensor.storage_key)
        if blob is None:
            raise ValueError(
                f"{path}: entry {name!r} names storage {tensor.storage_key!r}, which the file does not hold"
            )
        check_view(name, tensor.offset, tensor.size, tensor.stride, len(blob), path)
        itemsize = blob.dtype.itemsize
        array = np.lib.stride_tricks.as_strided(
            blob[tensor.offset :],
            shape=tensor.size,
            strides=tuple(s * itemsize for s in tensor.stride),
        )
        out[name] = np.array(array)  # own copy, contiguous
    return out
