"""The embedded EfficientNet-Lite0 port: real ImageNet weights, read without torch."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from train.torch_weights import UnsafePickleError, load_legacy_state_dict

skimage_data = pytest.importorskip("skimage").data_dir


def _photo(name: str) -> np.ndarray:
    img = Image.open(Path(skimage_data) / name).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)[None]


@pytest.fixture(scope="module")
def classifier():
    from train.efficientnet_lite import build_efficientnet_lite0

    return build_efficientnet_lite0(weights="imagenet", include_top=True)


def test_cat_photo_is_a_cat(classifier):
    logits = np.asarray(classifier(_photo("chelsea.png"), training=False))[0]
    assert int(np.argmax(logits)) in range(281, 286)  # tabby .. Egyptian cat


def test_coffee_photo_is_espresso_or_cup(classifier):
    logits = np.asarray(classifier(_photo("coffee.png"), training=False))[0]
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert top3 & {967, 968, 504}  # espresso, cup, coffee mug


def test_state_dict_is_complete():
    from train.efficientnet_lite import embedded_weights_path

    sd = load_legacy_state_dict(embedded_weights_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_conv_stem.weight"].dtype == np.float32
    assert np.isfinite(sd["_conv_head.weight"]).all()


def _legacy_file(tmp_path: Path, payload) -> Path:
    """A legacy-format .pth whose state-dict pickle is `payload`."""
    from train.torch_weights import LEGACY_MAGIC, SUPPORTED_PROTOCOL

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        for obj in (LEGACY_MAGIC, SUPPORTED_PROTOCOL, {"little_endian": True}):
            pickle.dump(obj, fh, protocol=2)
        pickle.dump(payload, fh, protocol=2)
        pickle.dump([], fh, protocol=2)
    return path


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _legacy_file(tmp_path, {"_conv_stem.weight": _RunsCode(marker)})
    with pytest.raises(UnsafePickleError, match="system"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_unpickler_refuses_zip_format(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises((ValueError, pickle.UnpicklingError)):  # a bad header, or not a pickle at all
        load_legacy_state_dict(path)


def _tensor_file(tmp_path: Path, views: dict[str, tuple[int, tuple, tuple]], storage: np.ndarray) -> Path:
    """A legacy .pth with one float32 storage and tensors viewing it as (offset, size, stride), written
    the way torch writes them (persistent storage ids, _rebuild_tensor_v2), without torch: stand-in
    modules named torch and torch._utils exist only while the file is pickled."""
    import sys
    import types

    from train.torch_weights import LEGACY_MAGIC, SUPPORTED_PROTOCOL

    # Any: stand-in modules, their attributes set below
    torch_mod: Any = types.ModuleType("torch")
    utils_mod: Any = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # the name torch's own pickles refer to
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    float_storage = type("FloatStorage", (), {"__module__": "torch"})
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod.FloatStorage, torch_mod._utils = float_storage, utils_mod

    class Storage:
        pass

    class Tensor:
        def __init__(self, offset, size, stride):
            self.args = (offset, size, stride)

        def __reduce__(self):
            return (_rebuild_tensor_v2, (Storage(), *self.args, False, collections.OrderedDict()))

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", float_storage, "0", "cpu", len(storage)) if isinstance(obj, Storage) else None

    path = tmp_path / "weights.pth"
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch_mod, "torch._utils": utils_mod})
    try:
        with open(path, "wb") as fh:
            for obj in (LEGACY_MAGIC, SUPPORTED_PROTOCOL, {"little_endian": True}):
                pickle.dump(obj, fh, protocol=2)
            Writer(fh, protocol=2).dump(collections.OrderedDict((n, Tensor(*v)) for n, v in views.items()))
            pickle.dump(["0"], fh, protocol=2)
            fh.write(np.int64(len(storage)).tobytes() + storage.astype("<f4").tobytes())
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return path


def test_tensor_views_are_read_and_bounds_checked(tmp_path):
    storage = np.arange(10, dtype=np.float32)
    ok = load_legacy_state_dict(_tensor_file(tmp_path, {"w": (2, (2, 3), (3, 1))}, storage))
    assert ok["w"].tolist() == [[2, 3, 4], [5, 6, 7]]
    for bad, why in [
        ((5, (10,), (1,)), "reads element 14"),  # runs off the end
        ((0, (2, 2), (9, 1)), "reads element 10"),  # a stride past the end
        ((-1, (2,), (1,)), "negative"),
        ((0, (3,), (-1,)), "negative"),
        ((0, (2, 2), (1,)), "2 sizes but 1 strides"),
    ]:
        with pytest.raises(ValueError, match=why):
            load_legacy_state_dict(_tensor_file(tmp_path, {"w": bad}, storage))
