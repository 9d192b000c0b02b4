"""cce-jax: linear classifier + cross-entropy without materialising the logits (Cut Cross-Entropy) in JAX."""

from cce_jax.api import compute_z_loss, linear_cross_entropy
from cce_jax.options import VocabParallelOptions
from cce_jax.xla import XlaConfig

__all__ = ["linear_cross_entropy", "compute_z_loss", "VocabParallelOptions", "XlaConfig"]
__version__ = "0.1.0"
