"""Rewrite a model's weights into TransformerLens's analysis form, computing the same function.

    model = process_weights(load_model("gpt2"))   # in place; what HookedTransformer.from_pretrained did

TransformerLens processes GPT-2's weights by default before any analysis (HookedTransformer's
from_pretrained, TransformerBridge's process_weights / enable_compatibility_mode), and much of
the published work on GPT-2 reads activations of the processed model. Four rewrites, each
exact in arithmetic (the log-probabilities stay the same to float32 rounding; tested):

- fold_ln: each LayerNorm's w and b move into the weights that read its output (ln1 into
  W_Q/W_K/W_V and b_Q/b_K/b_V, ln2 into W_in and b_in, ln_final into W_U and b_U), and the
  LayerNorms keep w = 1 and b = 0. The normalized input has zero mean over d_model, so those
  reading weights are also centred over d_model, which changes nothing they compute.
- center_writing_weights: every weight that writes to the residual stream (W_E, W_pos, W_O,
  b_O, W_out, b_out) is centred over d_model. Every reader of the stream is a LayerNorm,
  which subtracts the mean anyway; the stream itself then has zero mean at every position.
- center_unembed: W_U and b_U are centred over d_vocab. That shifts each position's logits by
  a constant: the logits change, their softmax does not.
- fold_value_biases: b_V moves into b_O (b_O += sum over heads of b_V W_O). A head's pattern
  sums to 1 over the keys, so b_V always adds b_V W_O to its output.

What changes is what the hooks see: the residual stream is centred, hook_v and hook_z lack
b_V, logits are centred. Parameter names and shapes stay the same, so a processed model saves
and loads as any other (with LayerNorm w = 1 and b = 0). The tensors are rewritten in place
(copy_), in float32 for a low-precision model and in float64 for a float64 one, so that
nothing holding the parameters (an optimizer, a kept CUDA graph) loses them. Meant for
analysis: training a processed model trains the same function from another parametrisation.
"""

import einops
import torch
from torch import Tensor

from solution import Transformer, at_least_float32, check_flags, check_model


def _fold_ln_into(weights: dict[str, Tensor], ln: str, readers: list[tuple[str, str, str]]) -> None:
    """Fold LayerNorm `ln`'s w and b into the (weight, bias, weight's axes) that read its output,
    and leave the identity (w = 1, b = 0) in their place.

    x_norm w + b, read by W and its bias: (x_norm w + b) W + bias = x_norm (w * W) + (bias + b W).
    x_norm has zero mean over d_model, so w * W is also centred over d_model, for free."""
    w, b = weights[f"{ln}.w"], weights[f"{ln}.b"]
    for W_name, b_name, axes in readers:
        W = weights[W_name]
        rest, centre = axes.replace("d_model", "").split(), axes.replace("d_model", "1")
        weights[b_name] = weights[b_name] + einops.einsum(b, W, f"d_model, {axes} -> {' '.join(rest)}")
        scaled = einops.einsum(w, W, f"d_model, {axes} -> {axes}")
        weights[W_name] = scaled - einops.reduce(scaled, f"{axes} -> {centre}", "mean")
    weights[f"{ln}.w"], weights[f"{ln}.b"] = torch.ones_like(w), torch.zeros_like(b)


def _fold_ln(weights: dict[str, Tensor], n_layers: int) -> None:
    for i in range(n_layers):
        attn, mlp = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
        qkv = [(f"{attn}W_{x}", f"{attn}b_{x}", "n_heads d_model d_head") for x in "QKV"]
        _fold_ln_into(weights, f"blocks.{i}.ln1", qkv)
        _fold_ln_into(weights, f"blocks.{i}.ln2", [(f"{mlp}W_in", f"{mlp}b_in", "d_model d_mlp")])
    _fold_ln_into(weights, "ln_final", [("unembed.W_U", "unembed.b_U", "d_model d_vocab")])


def _center_writing_weights(weights: dict[str, Tensor], n_layers: int) -> None:
    writers = [("embed.W_E", "d_vocab d_model -> d_vocab 1"), ("pos_embed.W_pos", "n_ctx d_model -> n_ctx 1")]
    for i in range(n_layers):
        writers += [
            (f"blocks.{i}.attn.W_O", "n_heads d_head d_model -> n_heads d_head 1"),
            (f"blocks.{i}.attn.b_O", "d_model -> 1"),
            (f"blocks.{i}.mlp.W_out", "d_mlp d_model -> d_mlp 1"),
            (f"blocks.{i}.mlp.b_out", "d_model -> 1"),
        ]
    for name, pattern in writers:
        weights[name] = weights[name] - einops.reduce(weights[name], pattern, "mean")


def _center_unembed(weights: dict[str, Tensor]) -> None:
    W_U, b_U = weights["unembed.W_U"], weights["unembed.b_U"]
    weights["unembed.W_U"] = W_U - einops.reduce(W_U, "d_model d_vocab -> d_model 1", "mean")
    weights["unembed.b_U"] = b_U - b_U.mean()


def _fold_value_biases(weights: dict[str, Tensor], n_layers: int, recentre: bool) -> None:
    for i in range(n_layers):
        attn = f"blocks.{i}.attn."
        b_V = weights[attn + "b_V"]
        b_O = weights[attn + "b_O"] + einops.einsum(
            b_V, weights[attn + "W_O"], "n_heads d_head, n_heads d_head d_model -> d_model"
        )
        # W_O is centred already, so b_V W_O is too, up to rounding, which this removes.
        weights[attn + "b_O"] = b_O - b_O.mean() if recentre else b_O
        weights[attn + "b_V"] = torch.zeros_like(b_V)


@torch.no_grad()
def process_weights(
    model: Transformer,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> Transformer:
    """Rewrite `model`'s weights in place into TransformerLens's processed form, and return it.

    The defaults are TransformerLens's (HookedTransformer.from_pretrained, TransformerBridge's
    process_weights); see the module docstring for what each does. Processing twice is the same
    as once.
    """
    check_model(model)
    check_flags(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    if W_E.untyped_storage().data_ptr() == W_U.untyped_storage().data_ptr():
        # Rewritten in place, a tied W_U would be rewritten twice, once as W_E.
        raise ValueError(
            "W_U shares its memory with W_E (tied embeddings); processing changes the two differently. "
            "Untie them first: model.unembed.W_U = torch.nn.Parameter(model.unembed.W_U.detach().clone())"
        )
    params = dict(model.named_parameters())
    # New tensors from here on (a float32 or float64 parameter is itself, never written to):
    # every rewrite reads the weights as they were before any is copied back.
    weights = {name: at_least_float32(param.detach()) for name, param in params.items()}
    n_layers = model.cfg.n_layers
    if fold_ln:
        _fold_ln(weights, n_layers)
    if center_writing_weights:
        _center_writing_weights(weights, n_layers)
    if center_unembed:
        _center_unembed(weights)
    if fold_value_biases:
        _fold_value_biases(weights, n_layers, recentre=center_writing_weights)
    for name, value in weights.items():
        params[name].copy_(value)
    return model


__all__ = ["process_weights"]
