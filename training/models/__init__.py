"""Model registry: build any supported classifier from a name and its options.

All models are :class:`~training.models.base.TappedClassifier` s, so training, block
selection, evaluation and the service tap blocks the same way whatever the architecture.
"""

from training.models.base import Features, TappedClassifier
from training.models.registry import MODEL_NAMES, build_model, load_state, load_weights

__all__ = [
           "MODEL_NAMES",
           "Features",
           "TappedClassifier",
           "build_model",
           "load_state",
           "load_weights",
]
