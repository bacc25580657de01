"""Export of a fine-tuned run: its embedding comes from the trained head, not the backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from indexer.model_card import read_card


def _embed_folder(model_dir: Path, folder: Path) -> tuple[np.ndarray, list[str]]:
    """Embed every image under folder/<class>/ with the ONNX model; labels = class folders."""
    from indexer.images import decode_image, prepare

    card = read_card(model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    files = sorted(folder.glob("*/*.jpg"))
    batch = np.stack([prepare(decode_image(f), card) for f in files])
    vectors = session.run(None, {card.input.name: batch})[0]
    return vectors, [f.parent.name for f in files]


def _nn_accuracy(model_dir: Path, corpus: Path) -> float:
    gallery, gallery_labels = _embed_folder(model_dir, corpus / "images")
    queries, query_labels = _embed_folder(model_dir, corpus / "queries")
    nearest = np.argmax(queries @ gallery.T, axis=1)
    return float(np.mean([gallery_labels[i] == q for i, q in zip(nearest, query_labels)]))


def test_finetuned_card_and_parity(finetuned_model):
    card = read_card(finetuned_model)
    assert card.source == "fine-tuned" and card.backbone == "efficientnet_lite0"
    assert card.dim == 256  # the head's embedding layer, not the 1280-d backbone features
    assert card.parity["min_cosine"] >= 0.9999
    assert card.class_names and len(card.class_names) >= 10


def test_finetuned_embeddings_differ_and_separate_classes(finetuned_model, default_model, demo_corpus):
    tuned, _ = _embed_folder(finetuned_model, demo_corpus / "queries")
    pretrained, _ = _embed_folder(default_model, demo_corpus / "queries")
    assert tuned.shape[1] != pretrained.shape[1]
    # Same images, different geometry: pairwise similarities must change, not just the basis.
    assert not np.allclose(tuned @ tuned.T, pretrained @ pretrained.T, atol=0.05)
    acc_tuned = _nn_accuracy(finetuned_model, demo_corpus)
    acc_pretrained = _nn_accuracy(default_model, demo_corpus)
    assert acc_tuned >= acc_pretrained, (acc_tuned, acc_pretrained)
    assert acc_tuned >= 0.9
