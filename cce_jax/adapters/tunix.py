"""Cut Cross-Entropy for the decoders of Google's Tunix (``google-tunix``): the loss without the logits.

A Tunix model's ``__call__`` ends with ``x = self.final_norm(x)`` followed by the logits ``x @ W`` over the
whole vocabulary (and, for Gemma 2 and 4, a tanh softcap). :func:`linear_cross_entropy` runs the same body up
to and including the final norm by calling the model's own submodules (``embedder``, ``layers``,
``final_norm``) and hands the hidden states and the model's own classifier to
:func:`cce_jax.linear_cross_entropy`, so the ``(B, T, V)`` logits are never formed. The classifier is passed in
the layout it is stored in, never copied or transposed: the tied embedding table ``embedder.input_embedding``
``(V, D)`` as ``classifier_layout="vd"``, an untied ``lm_head.w`` ``(D, V)`` as ``"dv"``.

Covered (Tunix 0.1.7, class ``tunix.models.<family>.model.<Class>``, and subclasses):

- ``gemma``: ``Gemma`` (Gemma 1 and 2), tied embedding table, ``final_logit_softcap`` from the config;
- ``gemma3``: ``Gemma3``, tied table, image inputs (``images=``) merged by the model's own input step;
- ``gemma4``: ``Gemma4``, tied table, ``final_logit_softcap``, per-layer inputs and KV sharing between layers;
- ``llama3``: ``Llama3``, ``lm_head.w``, or the table with ``weight_tying``;
- ``qwen2``: ``Qwen2``, ``lm_head.w``, or the table with ``use_tied_embedding``;
- ``qwen3``: ``Qwen3`` (dense and MoE), ``lm_head.w``, or the table with ``use_tied_embedding``.

The models' ``output_hidden_states=True`` hook (Gemma, Gemma 3, Qwen) is not used: it sows the hidden states
but still computes the logits.

:func:`sft_loss_fn` / :func:`make_sft_loss_fn` have the signature of ``tunix.sft.peft_trainer``'s loss
hook (``PeftTrainer.with_loss_fn``) and compute what its default loss computes (next-token cross-entropy,
mean over the positions whose target ``input_mask`` is set).

This module imports flax but not tunix: a model is recognised by its class's module and name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cce_jax import api

__all__ = [
    "FAMILIES",
    "Classifier",
    "classifier",
    "family",
    "hidden_states",
    "linear_cross_entropy",
    "make_sft_loss_fn",
    "sft_loss_fn",
]

# Options the adapter decides from the model: passing them is an error, not an override.
_MODEL_DECIDED = {
    "classifier_layout": "the layout the model stores its classifier in",
    "softcap": "the model's config.final_logit_softcap",
    "bias": "none (Tunix decoders have no classifier bias)",
}
_LOSS_OPTIONS = frozenset(inspect.signature(api.linear_cross_entropy).parameters) - {"e", "c", "targets"}


class Classifier(NamedTuple):
    """A model's classifier as :func:`cce_jax.linear_cross_entropy` takes it."""

    weight: jax.Array  # the stored array itself: (V, D) for "vd", (D, V) for "dv"
    layout: str  # "vd" or "dv"
    softcap: float | None  # final-logit softcap of the model, None if it has none


def _reject_images(name: str, images: Any) -> None:
    if images is not None:
        raise ValueError(f"images: a Tunix {name} model takes text only; pass images=None")


def _reject_segment_ids(name: str, segment_ids: Any) -> None:
    if segment_ids is not None:
        raise ValueError(f"segment_ids: the Tunix {name} model's __call__ has no segment_ids; pass None")


def _run_layers(model: nnx.Module, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """``x`` through every decoder layer without a KV cache; each layer returns ``(cache, x)``."""
    for layer in model.layers:
        _, x = layer(x, *args, **kwargs)
    return x


def _gemma_body(model, tokens, positions, attention_mask, images, segment_ids):
    _reject_images("Gemma", images)
    _reject_segment_ids("Gemma", segment_ids)
    x = model.embedder.encode(tokens)
    return model.final_norm(_run_layers(model, x, positions, None, attention_mask))


def _gemma3_body(model, tokens, positions, attention_mask, images, segment_ids):
    _reject_segment_ids("Gemma3", segment_ids)
    # The model's own input step: token embeddings, and the vision encoder's soft tokens merged in when
    # images are given (it raises itself for a text-only model).
    x = model._encode_and_get_inputs(tokens=tokens, images=images)
    return model.final_norm(_run_layers(model, x, positions, None, attention_mask))


def _gemma4_body(model, tokens, positions, attention_mask, images, segment_ids):
    _reject_images("Gemma4", images)
    del segment_ids  # Gemma4.__call__ accepts and drops it too
    if positions is None:  # Gemma4.__call__'s default
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embedder.encode(tokens)
    per_layer = model.embedder.encode_per_layer_input(x, tokens) if model.config.per_layer_input_dim > 0 else None
    # KV sharing as in Gemma4.__call__ without a cache: a shared layer attends with the keys and values of
    # the layer named by kv_cache_sharing_patterns, during a prefill (T > 1) its fresh projections.
    prefill = tokens.shape[1] > 1
    kvs, caches = {}, {}
    for i, layer in enumerate(model.layers):
        source = model.kv_cache_sharing_patterns[i]
        shared = None
        if source != i:
            shared = dict(zip(("k", "v"), kvs[source])) if prefill else caches.get(source)
        caches[i], x, kvs[i] = layer(
            x, positions, None, attention_mask,
            per_layer_input=None if per_layer is None else per_layer[:, :, i, :],
            kv_shared_cache=shared,
        )
    return model.final_norm(x)


def _llama3_body(model, tokens, positions, attention_mask, images, segment_ids):
    _reject_images("Llama3", images)
    _reject_segment_ids("Llama3", segment_ids)
    x = model.embedder.encode(tokens)
    return model.final_norm(_run_layers(model, x, positions, None, attention_mask))


def _qwen2_body(model, tokens, positions, attention_mask, images, segment_ids):
    _reject_images("Qwen2", images)
    x = model.embedder.encode(tokens)
    # Qwen2 computes the rotary tables once for all layers, with its module's own function.
    qwen2 = importlib.import_module(FAMILIES["qwen2"].module)  # already imported: model is one of its classes
    sin, cos = qwen2._generate_pos_embeddings(positions, model.config.head_dim, model.config.rope_theta)
    sin, cos = sin.astype(x.dtype), cos.astype(x.dtype)
    return model.final_norm(_run_layers(model, x, None, attention_mask, sin, cos, segment_ids=segment_ids))


def _qwen3_body(model, tokens, positions, attention_mask, images, segment_ids):
    _reject_images("Qwen3", images)
    x = model.embedder.encode(tokens)
    return model.final_norm(_run_layers(model, x, positions, None, attention_mask, segment_ids=segment_ids))


def _table(model) -> jax.Array:
    return model.embedder.input_embedding.get_value()


def _lm_head(model) -> jax.Array:
    head = model.lm_head
    if getattr(head, "einsum_str", None) != "BTD,DV->BTV":
        raise ValueError(f"model.lm_head: expected Tunix's Einsum 'BTD,DV->BTV' with w of shape (D, V), got "
                         f"{type(head).__name__} with einsum_str={getattr(head, 'einsum_str', None)!r}")
    return head.w.get_value()


def _gemma_head(model):
    return Classifier(_table(model), "vd", model.final_logits_softcap)


def _gemma3_head(model):
    return Classifier(_table(model), "vd", None)


def _gemma4_head(model):
    return Classifier(_table(model), "vd", model.config.final_logit_softcap)


def _llama3_head(model):
    if model.config.weight_tying:
        return Classifier(_table(model), "vd", None)
    return Classifier(_lm_head(model), "dv", None)


def _qwen_head(model):
    if model.config.use_tied_embedding:
        return Classifier(_table(model), "vd", None)
    return Classifier(_lm_head(model), "dv", None)


class _Family(NamedTuple):
    module: str
    cls: str
    body: Callable[..., jax.Array]
    head: Callable[[Any], Classifier]


FAMILIES: dict[str, _Family] = {
    "gemma": _Family("tunix.models.gemma.model", "Gemma", _gemma_body, _gemma_head),
    "gemma3": _Family("tunix.models.gemma3.model", "Gemma3", _gemma3_body, _gemma3_head),
    "gemma4": _Family("tunix.models.gemma4.model", "Gemma4", _gemma4_body, _gemma4_head),
    "llama3": _Family("tunix.models.llama3.model", "Llama3", _llama3_body, _llama3_head),
    "qwen2": _Family("tunix.models.qwen2.model", "Qwen2", _qwen2_body, _qwen_head),
    "qwen3": _Family("tunix.models.qwen3.model", "Qwen3", _qwen3_body, _qwen_head),
}
"""Supported Tunix decoders: family name -> (module, class name, body up to the final norm, classifier)."""


def _owner(model: Any, name: str) -> type | None:
    """The class in ``type(model).__mro__`` that is family ``name``'s model class (subclasses count)."""
    spec = FAMILIES[name]
    for cls in type(model).__mro__:
        if cls.__module__ == spec.module and cls.__name__ == spec.cls:
            return cls
    return None


def family(model: Any) -> str:
    """The Tunix family of ``model`` (a key of :data:`FAMILIES`); a ``TypeError`` for any other object."""
    for name in FAMILIES:
        if _owner(model, name) is not None:
            return name
    supported = ", ".join(f"{f.module}.{f.cls}" for f in FAMILIES.values())
    raise TypeError(f"model must be a Tunix decoder ({supported}) or a subclass, got {type(model).__qualname__} "
                    f"from {type(model).__module__}")


def classifier(model: Any) -> Classifier:
    """``model``'s classifier as stored (no copy, no transpose), its layout and its final-logit softcap.

    Raises a ``ValueError`` if the classifier module carries LoRA parameters: the loss uses the stored weight
    only, so such adapters would silently be left out.
    """
    name = family(model)
    head = FAMILIES[name].head(model)
    module = model.embedder if head.layout == "vd" else model.lm_head
    if jax.tree_util.tree_leaves(nnx.state(module, nnx.LoRAParam)):
        where = "model.embedder" if head.layout == "vd" else "model.lm_head"
        raise ValueError(f"{where} (the classifier) has LoRA parameters, which the loss would ignore; leave it "
                         f"out of the LoRA module pattern")
    return head


def hidden_states(
    model: Any,
    input_tokens: jax.Array,
    positions: jax.Array | None,
    attention_mask: jax.Array | None,
    *,
    images: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The output of ``model.final_norm``, ``(B, T, D)``: the model's ``__call__`` without a cache and
    without its last step, the logits.

    Arguments are those of the model's ``__call__`` (``positions`` ``(B, T)``, ``attention_mask``
    ``(B, T, T)``); ``images`` only for a Gemma 3 model with a vision encoder, ``segment_ids`` only for
    Qwen 2/3 (and Gemma 4, which ignores them).
    """
    if not hasattr(input_tokens, "ndim") or input_tokens.ndim != 2:
        raise ValueError(f"input_tokens must be a (batch, length) integer array, got "
                         f"{getattr(input_tokens, 'shape', type(input_tokens).__name__)}")
    return FAMILIES[family(model)].body(model, input_tokens, positions, attention_mask, images, segment_ids)


def linear_cross_entropy(
    model: Any,
    input_tokens: jax.Array,
    targets: jax.Array,
    positions: jax.Array | None,
    attention_mask: jax.Array | None,
    *,
    images: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    **loss_options: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Cross-entropy of a Tunix model's logits against ``targets``, without computing the logits.

    Equal to ``optax.softmax_cross_entropy_with_integer_labels(model(input_tokens, positions, None,
    attention_mask)[0], targets)`` reduced as asked, in float32. ``targets`` is ``(B, T)``; use
    ``targets=input_tokens, shift=1`` for next-token prediction and ``ignore_index`` (default -100) for
    positions that must not count. Every option of :func:`cce_jax.linear_cross_entropy` (``reduction``,
    ``shift``, ``weights``, ``label_smoothing``, ``return_lse``, ``impl``, ...) passes through, except
    ``classifier_layout``, ``softcap`` and ``bias``, which the model decides.

    When the hidden states' dtype differs from the classifier's (a compute ``dtype`` other than
    ``param_dtype``), the hidden states are cast to the classifier's dtype; the weights never are.
    """
    for key, decided_by in _MODEL_DECIDED.items():
        if key in loss_options:
            raise TypeError(f"{key}: set by the model ({decided_by}); do not pass it")
    unknown = sorted(set(loss_options) - _LOSS_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; expected images, segment_ids or "
                        f"options of cce_jax.linear_cross_entropy ({', '.join(sorted(_LOSS_OPTIONS))})")
    head = classifier(model)
    e = hidden_states(model, input_tokens, positions, attention_mask, images=images, segment_ids=segment_ids)
    if e.dtype != head.weight.dtype:
        e = e.astype(head.weight.dtype)
    return api.linear_cross_entropy(e, head.weight, targets, softcap=head.softcap,
                                    classifier_layout=head.layout, **loss_options)


_SFT_FIXED = {
    "shift": "the trainer's loss is next-token (shift=1)",
    "weights": "the trainer passes no per-token weights; input_mask selects the tokens",
    "return_lse": "the trainer's loss hook returns the loss alone",
}


def make_sft_loss_fn(**loss_options: Any) -> Callable[..., jax.Array]:
    """A loss for ``tunix.sft.peft_trainer.PeftTrainer.with_loss_fn`` with options of
    :func:`cce_jax.linear_cross_entropy` fixed (e.g. ``impl="cce"``, ``label_smoothing=0.1``).

    The returned ``loss_fn(model, input_tokens, input_mask, positions, attention_mask, images=None)`` has the
    signature of the trainer's default loss (the keys your ``gen_model_input_fn`` returns) and the same
    value: next-token cross-entropy averaged over the positions whose target has ``input_mask`` set (0.0 if
    none has). ``reduction="sum"`` gives the sum instead; ``"none"``, ``shift``, ``weights`` and
    ``return_lse`` are refused (the trainer needs one scalar).
    """
    for key, why in {**_MODEL_DECIDED, **_SFT_FIXED}.items():
        if key in loss_options:
            raise TypeError(f"{key}: fixed for the SFT loss ({why}); do not pass it")
    unknown = sorted(set(loss_options) - _LOSS_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; expected options of "
                        f"cce_jax.linear_cross_entropy")
    if loss_options.get("reduction", "mean") not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for the SFT trainer (it needs a scalar loss), got "
                         f"{loss_options['reduction']!r}")
    ignore_index = loss_options.get("ignore_index", -100)

    def loss_fn(
        model: nnx.Module,
        input_tokens: jax.Array,
        input_mask: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        images: jax.Array | None = None,
    ) -> jax.Array:
        if getattr(input_mask, "shape", None) != input_tokens.shape:
            raise ValueError(f"input_mask must have the shape of input_tokens {input_tokens.shape}, got "
                             f"{getattr(input_mask, 'shape', type(input_mask).__name__)}")
        targets = jnp.where(input_mask.astype(bool), input_tokens, jnp.asarray(ignore_index, input_tokens.dtype))
        return linear_cross_entropy(model, input_tokens, targets, positions, attention_mask, images=images,
                                    shift=1, **loss_options)

    loss_fn.__doc__ = f"Tunix SFT loss through cce_jax.linear_cross_entropy (options: {loss_options or 'defaults'})."
    return loss_fn


sft_loss_fn = make_sft_loss_fn()
"""The Tunix SFT loss with the default options: ``trainer.with_loss_fn(sft_loss_fn)``."""
