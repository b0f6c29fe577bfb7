"""Model adapters (one per family) behind :class:`ModelAdapter`, model resolution and offline tiny models.

Importing this package is cheap: diffusers/transformers/peft are imported only when a model is built.
"""

from .base import Conditioning, ModelAdapter
from .loading import load_adapter, resolve_model_path
from .tiny import make_tiny_model

__all__ = ["Conditioning", "ModelAdapter", "load_adapter", "make_tiny_model", "resolve_model_path"]
