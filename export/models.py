"""Where the Keras embedding model comes from: a pretrained backbone or a fine-tuning run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EmbeddingSource:
    model: object  # keras.Model: float pixels (batch, S, S, 3) -> unit vectors (batch, dim)
    backbone: str
    source: str  # "pretrained" | "fine-tuned"
    input_size: int
    class_names: list[str] | None
    data_dir: Path | None  # the images it was trained on, if any (default check images)
    pooling: str = "gap"  # how the backbone's last feature map became a vector
    gem_p: float | None = None  # GeM's exponent when pooling == "gem"


def from_backbone(
    name: str, weights: str | None = "imagenet", pooling: str = "gap", gem_p: float = 3.0
) -> EmbeddingSource:
    """A pretrained backbone's pooled features ("gap" average or "gem" generalised-mean
    pooling of its last feature map), L2-normalised."""
    import keras

    from train.backbones import get_backbone
    from train.layers import L2Normalize

    backbone = get_backbone(name)
    features = backbone.build(weights, pooling=pooling, gem_p=gem_p)
    outputs = L2Normalize(name="embedding_norm")(features.output)
    model = keras.Model(features.input, outputs, name=f"{name}_{pooling}_embedding")
    return EmbeddingSource(
        model, name, "pretrained", backbone.input_size, None, None, pooling, gem_p if pooling == "gem" else None
    )


def resolve_run(path: Path) -> tuple[Path, Path]:
    """(model.keras, run folder) from a run folder or a .keras file inside one."""
    path = Path(path)
    if path.is_dir():
        model_file, run_dir = path / "model.keras", path
    else:
        model_file, run_dir = path, path.parent
    if not model_file.is_file():
        raise FileNotFoundError(f"no Keras model at {model_file}; train one with `python -m train`")
    return model_file, run_dir


def from_run(path: Path) -> EmbeddingSource:
    """The fine-tuned head's embedding layer (`embedding_norm`), not the frozen backbone's."""
    import keras

    import train.layers  # noqa: F401  (registers the custom layers for load_model)

    model_file, run_dir = resolve_run(path)
    full = keras.models.load_model(model_file, compile=False)
    try:
        embedding = full.get_layer("embedding_norm").output
    except ValueError as exc:
        raise ValueError(f"{model_file} has no `embedding_norm` layer: not a model from `python -m train`") from exc
    model = keras.Model(full.input, embedding, name="fine_tuned_embedding")
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    classes_file = run_dir / "classes.json"
    class_names = json.loads(classes_file.read_text()) if classes_file.is_file() else None
    size = int(full.input.shape[1])
    data_dir = Path(run["data"]) if run.get("data") else None
    return EmbeddingSource(
        model, run.get("backbone", "unknown"), "fine-tuned", size, class_names, data_dir, run.get("pooling", "gap")
    )
