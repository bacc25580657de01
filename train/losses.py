"""Losses made for retrieval, chosen with `python -m train --loss`.

- `softmax`: today's head, a softmax classifier over the scaled unit embedding; plain
  cross-entropy on its probabilities (Keras' own loss, nothing here).
- `cosface` (Wang et al. 2018, large-margin cosine loss): the head outputs the cosine to one
  centre per class (`train.layers.CosineClassifier`); the loss subtracts a margin m from the
  true class's cosine and scales by s before the softmax, so classes must be apart by m.
- `arcface` (Deng et al. 2019): the same head, the margin is added to the angle instead.
- `multisimilarity` (Wang et al. 2019): a pair loss on the unit embeddings of one batch; it
  needs several images of each class per batch (`train.dataset.ClassBalancedBatches`).

Every loss is registered with Keras, so that a model.keras compiled with it reloads once this
module is imported (export loads with compile=False and does not need it).
"""

from __future__ import annotations

import math

import keras
from keras import ops

LOSSES = ("softmax", "cosface", "arcface", "multisimilarity")
MARGIN_LOSSES = ("cosface", "arcface")
PAIR_LOSSES = ("multisimilarity",)
DEFAULT_SCALE = 30.0
DEFAULT_MARGINS = {"cosface": 0.2, "arcface": 0.3}


def _one_hot(y_true, n_classes: int):
    return ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n_classes)


@keras.saving.register_keras_serializable(package="imgsearch")
class CosFaceLoss(keras.losses.Loss):
    """Cross-entropy of s * (cos - m * onehot): y_pred are cosines (batch, classes)."""

    def __init__(self, scale: float = DEFAULT_SCALE, margin: float = 0.2, name: str = "cosface", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.scale, self.margin = float(scale), float(margin)

    def call(self, y_true, y_pred):
        onehot = _one_hot(y_true, ops.shape(y_pred)[-1])
        logits = self.scale * (y_pred - self.margin * onehot)
        return keras.losses.categorical_crossentropy(onehot, logits, from_logits=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "margin": self.margin}


@keras.saving.register_keras_serializable(package="imgsearch")
class ArcFaceLoss(keras.losses.Loss):
    """Cross-entropy of s * cos(theta + m) for the true class, s * cos(theta) for the others."""

    def __init__(self, scale: float = DEFAULT_SCALE, margin: float = 0.3, name: str = "arcface", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.scale, self.margin = float(scale), float(margin)

    def call(self, y_true, y_pred):
        onehot = _one_hot(y_true, ops.shape(y_pred)[-1])
        cos = ops.clip(y_pred, -1.0 + 1e-7, 1.0 - 1e-7)
        sin = ops.sqrt(1.0 - cos * cos)
        m = self.margin
        with_margin = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        # Past theta = pi - m, cos(theta + m) would rise again; fall back to CosFace's linear
        # penalty there so the target logit keeps decreasing with the angle (InsightFace).
        with_margin = ops.where(cos > math.cos(math.pi - m), with_margin, cos - math.sin(math.pi - m) * m)
        logits = self.scale * (onehot * with_margin + (1.0 - onehot) * cos)
        return keras.losses.categorical_crossentropy(onehot, logits, from_logits=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "margin": self.margin}


@keras.saving.register_keras_serializable(package="imgsearch")
class MultiSimilarityLoss(keras.losses.Loss):
    """Multi-Similarity loss with its pair mining, on unit embeddings y_pred (batch, dim).

    For anchor i, a negative j is kept if S_ij + epsilon > the hardest positive's similarity,
    a positive if S_ij - epsilon < the hardest negative's; then
        1/alpha log(1 + sum_P exp(-alpha (S_ij - base))) + 1/beta log(1 + sum_N exp(beta (S_ij - base))).
    Defaults are the paper's (alpha 2, beta 50, base 0.5, epsilon 0.1). An anchor without a
    positive or negative in the batch contributes 0.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        name: str = "multisimilarity",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta = float(alpha), float(beta)
        self.base, self.epsilon = float(base), float(epsilon)

    def call(self, y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        sims = ops.matmul(y_pred, ops.transpose(y_pred))
        same = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32")
        eye = ops.eye(ops.shape(labels)[0], dtype="float32")
        pos, neg = same - eye, 1.0 - same
        # Hardest positive = lowest similarity, hardest negative = highest (big sentinels
        # where a pair is not of that kind).
        hardest_pos = ops.min(sims + 10.0 * (1.0 - pos), axis=1, keepdims=True)
        hardest_neg = ops.max(sims - 10.0 * (1.0 - neg), axis=1, keepdims=True)
        keep_neg = neg * ops.cast(sims + self.epsilon > hardest_pos, "float32")
        keep_pos = pos * ops.cast(sims - self.epsilon < hardest_neg, "float32")
        pos_term = ops.log1p(ops.sum(keep_pos * ops.exp(-self.alpha * (sims - self.base)), 1))
        neg_term = ops.log1p(ops.sum(keep_neg * ops.exp(self.beta * (sims - self.base)), 1))
        return pos_term / self.alpha + neg_term / self.beta

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "beta": self.beta,
            "base": self.base,
            "epsilon": self.epsilon,
        }


def default_margin(loss: str) -> float:
    """The margin a margin loss uses when none is given (0 for the others)."""
    return DEFAULT_MARGINS.get(loss, 0.0)


def make_loss(loss: str, *, scale: float = DEFAULT_SCALE, margin: float | None = None):
    """The Keras loss for `--loss NAME`; raises ValueError for an unknown name."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from: {', '.join(LOSSES)}")
    margin = default_margin(loss) if margin is None else margin
    if loss == "cosface":
        return CosFaceLoss(scale, margin)
    if loss == "arcface":
        return ArcFaceLoss(scale, margin)
    if loss == "multisimilarity":
        return MultiSimilarityLoss()
    return keras.losses.SparseCategoricalCrossentropy(name="softmax")


__all__ = [
    "LOSSES",
    "MARGIN_LOSSES",
    "PAIR_LOSSES",
    "CosFaceLoss",
    "ArcFaceLoss",
    "MultiSimilarityLoss",
    "make_loss",
    "default_margin",
    "DEFAULT_SCALE",
]
