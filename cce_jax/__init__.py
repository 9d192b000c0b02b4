"""cce-jax: linear classifier + cross-entropy without materialising the logits (Cut Cross-Entropy) in JAX."""

from cce_jax.api import compute_z_loss, linear_cross_entropy
from cce_jax.cce import KernelConfig
from cce_jax.checks import AUTO_DENSE_MAX_LOGIT_BYTES, TargetsOutOfRangeError
from cce_jax.options import VocabParallelOptions
from cce_jax.vocab_parallel import (
    pad_vocab_shards,
    sharded_linear_cross_entropy,
    unpad_vocab_shards,
    vocab_parallel_options,
    vocab_partition,
)
from cce_jax.xla import XlaConfig

__all__ = [
    "AUTO_DENSE_MAX_LOGIT_BYTES",
    "KernelConfig",
    "VocabParallelOptions",
    "TargetsOutOfRangeError",
    "XlaConfig",
    "compute_z_loss",
    "linear_cross_entropy",
    "pad_vocab_shards",
    "sharded_linear_cross_entropy",
    "unpad_vocab_shards",
    "vocab_parallel_options",
    "vocab_partition",
]
__version__ = "0.1.0"
