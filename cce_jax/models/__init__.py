"""Model-family adapters: a Flax NNX decoder whose per-family configuration carries each family's head details.

``cce_jax.models`` imports flax; ``import cce_jax`` alone does not.

Example::

    from flax import nnx
    from cce_jax.models import Decoder, family_config

    cfg = family_config("gemma2", vocab_size=32_003, d_model=256, n_layers=4, n_heads=4)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    loss = model(tokens, tokens)   # next-token loss with Gemma 2's final softcap 30, tied embeddings
"""

from cce_jax.optional import require_flax

require_flax("cce_jax.models")

from cce_jax.models.config import FAMILIES, DecoderConfig, family_config
from cce_jax.models.decoder import Decoder

__all__ = ["FAMILIES", "Decoder", "DecoderConfig", "family_config"]
