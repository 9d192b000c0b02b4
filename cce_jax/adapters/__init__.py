"""Adapters that put :func:`cce_jax.linear_cross_entropy` under the language models of existing JAX libraries.

:mod:`cce_jax.adapters.tunix`: the Flax NNX decoders of Google's Tunix (``google-tunix``), Gemma 1/2/3/4,
Llama 3 and Qwen 2/3, and a drop-in loss for its supervised fine-tuning trainer. Each adapter module imports
its library; ``import cce_jax.adapters`` alone imports nothing beyond this docstring.
"""
