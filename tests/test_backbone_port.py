"""The embedded EfficientNet-Lite0 port: real ImageNet weights, read without torch."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.torch_weights import UnsafePickleError, load_legacy_state_dict

skimage_data = pytest.importorskip("skimage").data_dir


def _photo(name: str) -> np.ndarray:
    img = Image.open(Path(skimage_data) / name).convert("RGB").resize((224, 224), Image.BILINEAR)
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
    with pytest.raises(Exception):
        load_legacy_state_dict(path)
