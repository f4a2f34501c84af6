"""Interpretability by import: an activation cache, logit lens, direct logit attribution,
activation patching, induction scores, and plots of each.

    logits, cache = model.run_with_cache(tokens)        # an ActivationCache (a dict of hook name -> tensor)
    cache["pattern", 3]                                 # = cache["blocks.3.attn.hook_pattern"]
    resid = cache.accumulated_resid(apply_ln=True)      # [component batch pos d_model], ln_final of each
    print(test_prompt(model, prompt, " answer"))       # the answer's rank and the top tokens, as TransformerLens
    lens = logit_lens(model, tokens)                    # logits read off every layer's residual stream
    dla = direct_logit_attribution(model, cache, correct=tok_a, incorrect=tok_b)
    grid = activation_patching(model, clean, corrupted, metric, hook="resid_pre")  # [n_layers pos]
    scores = induction_score(model)                     # [n_layers n_heads]
    plot_induction_scores(scores, path="induction.png")

Conventions, arguments and results follow TransformerLens 4's ActivationCache (tested against it
on the bridge): components are stacked on a new leading axis with labels ("embed", "pos_embed",
"0_attn_out", "L0H3", "L0N17", "bias", ...), down to every head and neuron with
get_full_resid_decomposition, and `apply_ln_to_stack` centres each component and divides by the
scale the LayerNorm computed on the real forward pass (cached at hook_scale), without w and b,
so that the components still add up. The exception, TransformerLens 4's too: accumulated_resid
with apply_ln over the whole model applies ln_final to each entry on its own (the logit lens).
"""

import functools
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import Slice

from gpt2_small.bridge_names import bridge_name_hint
from gpt2_small.sampling import check_seed, mask_padding_ids
from gpt2_small.tokenizer import EOT_ID, GPT2_VOCAB, to_single_token, to_str_tokens, to_string, to_tokens
from solution import (
    OPTIONAL_HOOKS,
    Transformer,
    _optional_hook_setter,
    at_least_float32,
    check_count,
    check_device,
    check_flag,
    check_flags,
    check_model,
    did_you_mean,
    user_path,
)

logger = logging.getLogger(__name__)

# Short names, as TransformerLens's get_act_name spells them, of every per-layer hook.
_BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
}
# TransformerLens's optional per-layer hooks: the model has them once their setter is on
# (model.set_use_attn_result(True) and the others). A cache can hold "result" without it too:
# ActivationCache.compute_head_results fills it from z and W_O.
_OPTIONAL_HOOKS = {name.rpartition("hook_")[2]: name for name in OPTIONAL_HOOKS}  # "result": "attn.hook_result"
_PER_LAYER_HOOKS = {**_BLOCK_HOOKS, **_OPTIONAL_HOOKS}
# Those with an n_heads axis, which patching can take one head of.
_HEAD_HOOKS = ("q", "k", "v", "z", "attn_scores", "pattern", "result", "attn_in", "q_input", "k_input", "v_input")
# get_act_name's other spellings of the same hooks.
_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
            "mlp_pre": "pre", "mlp_post": "post"}  # fmt: skip
# The layer_type each per-layer hook takes, in get_act_name's spellings (it is implied, so optional).
_LAYER_TYPES = {"attn.": ("a", "attn", "attention"), "mlp.": ("m", "mlp"), "hook_": ("b", "block", "blocks", "")}
_LN_HOOKS = ("scale", "normalized")  # per LayerNorm: layer_type "ln1" or "ln2", or no layer for ln_final
# get_act_name's compact spelling, name + layer [+ layer_type]: "k6", "pattern10", "scale4ln1". Its
# own regex: a name with "_" ("resid_pre3") cannot take it, there as here.
_COMPACT = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name, as TransformerLens's get_act_name gives it: act_name("pattern", 3) ==
    "blocks.3.attn.hook_pattern", act_name("scale", 3, "ln1") == "blocks.3.ln1.hook_scale",
    act_name("scale") == "ln_final.hook_scale", and compactly act_name("k6") == "blocks.6.attn.hook_k",
    act_name("scale4ln1") == "blocks.4.ln1.hook_scale"; full names pass through, given alone."""
    if not isinstance(name, str):  # else "'tuple' object has no attribute 'startswith'"
        raise TypeError(f"a hook name must be a str, got {type(name).__name__} {name!r}")
    if name.startswith(("blocks.", "hook_", "ln_final.")):
        if layer is None and layer_type is None:
            return name
        # get_act_name glues them on regardless ("blocks.3.hook_blocks.0.attn.hook_pattern").
        raise ValueError(
            f"{name!r} is a full hook name already; pass no layer or layer_type with it "
            f"(got layer={layer!r}, layer_type={layer_type!r})"
        )
    given = name
    if layer is None and layer_type is None and (compact := _COMPACT.fullmatch(name)):
        name, layer, layer_type = compact[1], int(compact[2]), compact[3] or None
    name = _ALIASES.get(name, name)
    if name in _LN_HOOKS:
        if layer is None and layer_type in (None, "ln_final"):
            return f"ln_final.hook_{name}"
        if layer is None or layer_type not in ("ln1", "ln2"):
            raise ValueError(
                f"hook {name!r} is a LayerNorm's: pass a layer and layer_type 'ln1' or 'ln2' (a block's), or "
                f"neither (ln_final's); got layer={layer!r}, layer_type={layer_type!r}"
            )
        return f"blocks.{layer}.{layer_type}.hook_{name}"
    if name in ("embed", "pos_embed"):
        if layer is None and layer_type is None:
            return f"hook_{name}"
        raise ValueError(f"hook {name!r} is the model's, not a layer's: pass no layer or layer_type")
    hooks = _PER_LAYER_HOOKS
    if name not in hooks:
        known = sorted([*hooks, *_ALIASES, *_LN_HOOKS, "embed", "pos_embed"])
        glued = re.fullmatch(r"(\w+?)(\d+)", given)
        if glued and glued[1] in known:  # "resid_pre3": get_act_name's compact form takes no "_" either
            raise ValueError(f"unknown hook name {given!r}; give the layer apart: ({glued[1]!r}, {int(glued[2])})")
        raise ValueError(f"unknown hook name {given!r}; use a full name or one of {known}")
    if layer is None:
        raise ValueError(f"hook {name!r} is per layer: pass a layer")
    allowed = next(types for prefix, types in _LAYER_TYPES.items() if hooks[name].startswith(prefix))
    if layer_type is not None and layer_type not in allowed:
        raise ValueError(f"hook {name!r} takes layer_type None or one of {allowed}, got {layer_type!r}")
    return f"blocks.{layer}.{hooks[name]}"


# Which positions a cache helper keeps, as TransformerLens's Slice takes them: an int (the pos
# axis is then dropped), (start, stop[, step]), a slice, a list or array of positions, or None (all).
PosSlice = Slice | int | np.integer | tuple | slice | list | np.ndarray | Tensor | None
# Which tokens' logits logit_attrs reads, as TransformerLens takes them: one token (an id, a 0-d
# tensor, a str of one token), one per sequence ([batch]) or one per sequence and position.
TokenChoice = str | int | Int[Tensor, ""] | Int[Tensor, " batch"] | Int[Tensor, "batch pos"]


class ActivationCache(dict):
    """Hook name -> activation of one forward pass, with TransformerLens's residual-stream helpers.

    A plain dict underneath (so `cache["blocks.0.hook_resid_pre"]` works), plus `cache["resid_pre", 0]`.
    Needs a cache of every hook (run_with_cache with no names_filter) for the helpers below.
    `cache.to("cpu")` moves the activations off the GPU, in place, as in TransformerLens.
    `run_with_cache(tokens, remove_batch_dim=True)` on one prompt gives activations without their
    batch axis (has_batch_dim False), as in TransformerLens; the helpers' results then lack it too.
    """

    def __init__(self, activations: dict[str, Tensor], model: Transformer, has_batch_dim: bool = True):
        super().__init__(activations)
        self.model = check_model(model)
        self.has_batch_dim = check_flag("has_batch_dim", has_batch_dim)

    def __getitem__(self, key: str | tuple) -> Tensor:  # (name, layer), checked below
        # TransformerLens's shorthands: cache["resid_post", -1] (layers count from the end too),
        # cache["scale", 3, "ln1"] and cache["embed"]; a per-layer short name without its layer is
        # named by act_name.
        if isinstance(key, tuple):
            if len(key) not in (2, 3):
                raise KeyError(
                    f"a tuple key is (name, layer) or (name, layer, layer_type), such as ('pattern', 3) or "
                    f"('scale', 3, 'ln1'); got {key!r}"
                )
            name, layer, *layer_type = key
            if isinstance(layer, bool) or not isinstance(layer, Integral):
                raise KeyError(f"the layer of {key!r} must be an int, got {type(layer).__name__} {layer!r}")
            if not -self.n_layers <= layer < self.n_layers:
                raise KeyError(
                    f"layer {layer!r} is outside [-{self.n_layers}, {self.n_layers}) (n_layers={self.n_layers})"
                )
            try:
                key = act_name(name, int(layer) % self.n_layers, *layer_type)
            except ValueError as e:
                raise KeyError(f"{key!r} names no hook: {e}") from None
        elif isinstance(key, str) and not dict.__contains__(self, key):
            if (native := bridge_name_hint(key, self.n_layers)) is not None:
                raise KeyError(native)
            try:
                key = act_name(key)
            except ValueError as e:
                raise KeyError(f"{key!r} is not in this cache: {e}") from None
        if not dict.__contains__(self, key):
            raise KeyError(f"{key!r} is not in this cache ({self._missing_hint(key)})")
        return dict.__getitem__(self, key)

    def _missing_hint(self, key: object) -> str:
        """Why `key` is not in this cache, and what to do about it."""
        if (setter := _optional_hook_setter(key, self.n_layers)) is not None:
            # Off by default, so a cache holds these only from a run with the setter on.
            hint = f"it is one of TransformerLens's optional hooks: run with model.{setter}(True) to cache it"
            return hint + (", or call cache.compute_head_results()" if key.endswith(".attn.hook_result") else "")
        held = f"it holds {len(self)} activation{'' if len(self) == 1 else 's'}; see cache.keys()"
        if not isinstance(key, str):
            return held
        if key in self.model.hook_dict:
            return f"a hook of the model that the run's names_filter left out; {held}"
        if (block := re.match(r"blocks\.(\d+)\.", key)) and int(block[1]) >= self.n_layers:
            return f"this model has blocks 0 to {self.n_layers - 1} (n_layers={self.n_layers})"
        if guess := did_you_mean(key, self.model.hook_dict):
            return f"no hook has that name; {guess}"
        return held

    def to(self, device: str | torch.device) -> "ActivationCache":
        """Move every activation to `device`, in place, and return the cache, as TransformerLens's
        does: cache.to("cpu") frees the GPU memory a big cache holds. What also reads the model's
        weights (stack_head_results, accumulated_resid's ln_final, direct_logit_attribution)
        then needs the model on that device too, as in TransformerLens."""
        device = check_device(device)
        dict.update(self, {key: value.to(device) for key, value in self.items()})
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a one-sequence cache, in place, and return the cache, as
        TransformerLens's does: the same as run_with_cache(tokens, remove_batch_dim=True)."""
        if not self.has_batch_dim:
            logger.warning("remove_batch_dim: this cache has no batch axis already")
            return self
        if sizes := sorted({value.shape[0] for value in self.values()} - {1}):
            raise ValueError(f"remove_batch_dim needs a cache of one sequence (batch size 1), got batch sizes {sizes}")
        dict.update(self, {key: value[0] for key, value in self.items()})
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: PosSlice) -> "ActivationCache":
        """A new cache of the sequences `batch_slice` picks, as TransformerLens's: an int keeps one
        and drops the batch axis; (start, stop[, step]), a slice or a list keep several."""
        given, batch_slice = batch_slice, _as_slice(batch_slice)
        if not self.has_batch_dim and batch_slice.mode not in ("identity", "empty"):
            raise ValueError("this cache has no batch axis to slice (it was made with remove_batch_dim)")
        if not self.has_batch_dim:  # None: the whole cache, as it is
            return ActivationCache(dict(self), self.model, has_batch_dim=False)
        batch = max((value.shape[0] for value in self.values() if value.ndim > 0), default=0)
        _check_picks("batch_slice", given, batch_slice, batch, "sequences")
        # An entry of leading size 1 in a larger batch is broadcast over it, not one sequence's.
        sliced = {
            name: batch_slice.apply(value, dim=0) if value.ndim > 0 and value.shape[0] == batch else value
            for name, value in self.items()
        }
        return ActivationCache(sliced, self.model, has_batch_dim=self.has_batch_dim and batch_slice.mode != "int")

    def compute_head_results(self) -> None:
        """Add each layer's per-head results, z[h] @ W_O[h] ([*batch pos n_heads d_model]), to the
        cache as blocks.{l}.attn.hook_result, so that cache["result", l] works, as TransformerLens's
        does. Their sum over heads plus b_O is attn_out. Layers that have them keep them."""
        missing = [i for i in range(self.n_layers) if act_name("result", i) not in self]
        if not missing:
            logger.warning("compute_head_results: every layer's head results are in the cache already")
        for i in missing:
            self[act_name("result", i)] = einops.einsum(
                *_promoted(self["z", i], self.model.blocks[i].attn.W_O),
                "... n_heads d_head, n_heads d_head d_model -> ... n_heads d_model",
            )

    def _positions(self, pos_slice: PosSlice) -> Slice:
        """pos_slice as a Slice, refused by name if it indexes past the cache's positions or picks
        none: torch's IndexError named neither, and a range past the end gave empty stacks."""
        given, pos_slice = _spelled(pos_slice), _as_slice(pos_slice)
        if "hook_embed" not in self:  # a cache of some hooks only: their position axes differ
            return pos_slice
        _check_picks("pos_slice", given, pos_slice, self["hook_embed"].shape[-2], "positions")
        return pos_slice

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    def _layer(self, layer: int | None, *, stacked: str | None = None, mlp_input: bool = False) -> int:
        """None or -1 -> n_layers (the whole model), as in TransformerLens. A stack of `stacked`
        ("heads before it", ...) needs layer >= 1: TransformerLens returns an empty stack at 0,
        and a remainder from the *last* layer. mlp_input=True needs an MLP after the stream."""
        # "2" met the range check's < as a TypeError, and True was layer 1.
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, Integral)):
            raise TypeError(f"layer must be an int or None, got {layer!r}")
        if layer is None or layer == -1:
            layer = self.n_layers
        elif not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} is outside [0, n_layers={self.n_layers}] (or -1/None for all)")
        if stacked is not None and layer == 0:
            raise ValueError(f"layer 0 has no {stacked}; pass layer >= 1 (or None/-1 for all)")
        if mlp_input and layer == self.n_layers:
            raise ValueError(f"mlp_input needs a layer below n_layers={self.n_layers}: there is no MLP after the last")
        return layer

    def stack_activation(
        self, name: str, layer: int | None = -1, sublayer_type: str | None = None
    ) -> Float[Tensor, "layers_covered ..."]:
        """cache[name, i] of layers 0 .. layer-1 stacked on a new leading axis, as in TransformerLens:
        stack_activation("pattern") is every layer's pattern; sublayer_type picks ln1 or ln2 for
        "scale" and "normalized"."""
        layer = self._layer(layer, stacked="layers before it to stack")
        extra = () if sublayer_type is None else (sublayer_type,)
        return torch.stack([self[(name, i, *extra)] for i in range(layer)])

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Float[Tensor, "component *batch_and_pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream before each of layers 0 .. layer-1, and after the last block if layer = n_layers.

        layer=None means n_layers: the final entry is then the input of ln_final. incl_mid adds
        each earlier block's resid_mid, mlp_input layer's own (the input of its MLP). pos_slice
        keeps some positions, as TransformerLens's Slice takes it: -1 keeps the last and drops the
        pos axis, (start, stop) or a slice keeps a range, a list picks positions.

        apply_ln, as in TransformerLens 4: for layer = n_layers, ln_final (w and b included) on
        each entry with that entry's own statistics, the logit lens (`model.unembed` of it gives
        each layer's logits); for an earlier layer, the cached scale of the LayerNorm that reads
        the last entry, blocks[layer].ln1 (ln2 with mlp_input), as in apply_ln_to_stack.
        """
        check_flags(incl_mid=incl_mid, apply_ln=apply_ln, mlp_input=mlp_input, return_labels=return_labels)
        layer = self._layer(layer, mlp_input=mlp_input)
        labels, parts = [], []
        for i in range(layer + 1):
            if i == self.n_layers:
                labels.append("final_post")
                parts.append(self["resid_post", self.n_layers - 1])
                continue
            labels.append(f"{i}_pre")
            parts.append(self["resid_pre", i])
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                labels.append(f"{i}_mid")
                parts.append(self["resid_mid", i])
        pos_slice = self._positions(pos_slice)
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, layer, mlp_input, pos_slice=pos_slice, recompute_ln=layer == self.n_layers
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Float[Tensor, "component *batch_and_pos d_model"] | tuple[Tensor, list[str]]:
        """What each part of the model wrote into the residual stream read by `layer`.

        embed, pos_embed, then every earlier block's attn_out and mlp_out (and, with mlp_input,
        layer's own attn_out). They sum to resid_pre of `layer` (resid_mid with mlp_input), or
        to the final residual stream for layer = n_layers. As in TransformerLens, mode "attn" or
        "mlp" keeps only those outputs, incl_embeds=False leaves the embeddings out, and pos_slice
        is as in accumulated_resid; apply_ln is apply_ln_to_stack (cached scale).
        """
        check_flags(mlp_input=mlp_input, apply_ln=apply_ln, incl_embeds=incl_embeds, return_labels=return_labels)
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer, mlp_input=mlp_input)
        labels, parts = [], []
        if incl_embeds:
            labels += ["embed", "pos_embed"]
            parts += [self["hook_embed"], self["hook_pos_embed"]]
        for i in range(layer + int(mlp_input)):
            if mode != "mlp":
                labels.append(f"{i}_attn_out")
                parts.append(self["attn_out", i])
            if i < layer and mode != "attn":
                labels.append(f"{i}_mlp_out")
                parts.append(self["mlp_out", i])
        if not parts:
            raise ValueError(f"nothing to decompose: layer={layer}, mode={mode!r}, incl_embeds={incl_embeds}")
        pos_slice = self._positions(pos_slice)
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ) -> Float[Tensor, "component *batch_and_pos d_model"] | tuple[Tensor, list[str]]:
        """Each head's write into the residual stream, z[h] @ W_O[h], for every head of layers 0 .. layer-1.

        Labels are "L{layer}H{head}". b_O belongs to no head and is left out (it is
        `model.blocks[i].attn.b_O`): the heads of layer i sum to attn_out minus b_O. As in
        TransformerLens, incl_remainder appends "remainder", the rest of the residual stream
        (resid_post of layer - 1 minus the heads), and pos_slice is as in accumulated_resid.
        The arguments are in TransformerLens's order (return_labels second).
        """
        check_flags(return_labels=return_labels, incl_remainder=incl_remainder, apply_ln=apply_ln)
        layer = self._layer(layer, stacked="heads before it")
        pos_slice = self._positions(pos_slice)
        parts, labels = [], []
        for i in range(layer):
            per_head = einops.einsum(
                *_promoted(
                    pos_slice.apply(self["z", i], dim=-3), self.model.blocks[i].attn.W_O
                ),  # z: [batch] pos n_heads d_head
                "... n_heads d_head, n_heads d_head d_model -> n_heads ... d_model",
            )
            parts.append(per_head)
            labels += [f"L{i}H{h}" for h in range(per_head.shape[0])]
        stack = torch.cat(parts)
        if incl_remainder:
            remainder = pos_slice.apply(self["resid_post", layer - 1], dim=-2) - stack.sum(dim=0)
            stack = torch.cat([stack, remainder[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: PosSlice = None,
        pos_slice: PosSlice = None,
        project_output_onto: Tensor | None = None,
    ) -> Float[Tensor, "..."]:  # [*batch_and_pos neuron d_model], less what the arguments drop
        """What each neuron of layer's MLP writes into the residual stream, post[n] * W_out[n], as in
        TransformerLens: [*batch_and_pos neuron d_model]. b_out belongs to no neuron and is left out.

        neuron_slice and pos_slice are as pos_slice in accumulated_resid (an int drops its axis).
        project_output_onto, a [d_model] direction or [d_model n_outputs] directions, replaces
        d_model by the projections onto them, computed as (W_out @ directions) first, so that the
        [... neuron d_model] tensor is never built.
        """
        project, squeeze = self._projection(project_output_onto)
        results = self._neuron_results(layer, _as_slice(neuron_slice), self._positions(pos_slice), project)
        return results.squeeze(-1) if squeeze else results

    def _neuron_results(
        self, layer: int, neuron_slice: Slice, pos_slice: Slice, project: Tensor | None, centre: bool = False
    ) -> Tensor:
        """get_neuron_results; centre=True takes each neuron's W_out row minus its mean, which is
        what centring (the first step of a LayerNorm) does to every multiple of it."""
        post = neuron_slice.apply(pos_slice.apply(self["post", layer], dim=-2), dim=-1)
        W_out = neuron_slice.apply(self.model.blocks[layer].mlp.W_out, dim=0)  # [neuron] d_model
        if centre:
            W_out = W_out - W_out.mean(dim=-1, keepdim=True)
        if project is not None:
            W_out = _project(W_out, project)
        return post[..., None] * W_out

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice: PosSlice = None,
        neuron_slice: PosSlice = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Tensor | None = None,
        mlp_input: bool = False,
    ) -> Float[Tensor, "component ..."] | tuple[Tensor, list[str]]:  # [component *batch_and_pos d_model or projections]
        """Each neuron's write into the residual stream (get_neuron_results) for every neuron of layers
        0 .. layer-1, stacked on a new leading axis with labels "L{layer}N{neuron}", as in TransformerLens.

        incl_remainder appends "remainder", the rest of the stream that layer reads: resid_pre (or,
        with mlp_input, resid_mid, and apply_ln then uses ln2's scale). neuron_slice keeps some
        neurons of each layer (an int keeps one, and the axis). With project_output_onto and
        apply_ln, the cached-scale LayerNorm is applied before the projection without building the
        [neuron ... d_model] stack: it is linear, centring each W_out row and dividing by the scale.
        Every neuron of GPT-2 small is 36,864 components: at d_model each costs 3 KiB per position.
        """
        check_flags(return_labels=return_labels, incl_remainder=incl_remainder, apply_ln=apply_ln, mlp_input=mlp_input)
        layer = self._layer(layer, stacked="neurons before it", mlp_input=mlp_input)
        pos_slice, neuron_slice = self._positions(pos_slice), _as_slice(neuron_slice)
        if neuron_slice.mode == "int":  # the neuron axis is the stack's: keep it
            neuron_slice = Slice([neuron_slice.slice])
        project, squeeze = self._projection(project_output_onto)
        neurons = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0).tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in neurons]
        folded = apply_ln and project is not None
        parts = [self._neuron_results(i, neuron_slice, pos_slice, project, centre=folded) for i in range(layer)]
        stack = einops.rearrange(torch.cat(parts, dim=-2), "... neuron d -> neuron ... d")
        if folded:
            stack = stack / self._ln_scale(layer, mlp_input, pos_slice)
        if incl_remainder:
            target = self["resid_mid", layer] if mlp_input else self["resid_post", layer - 1]
            target = pos_slice.apply(target, dim=-2)
            if folded:
                target = self.apply_ln_to_stack(target[None], layer, mlp_input, pos_slice=pos_slice)[0]
            if project is not None:
                target = _project(target, project)
            stack = torch.cat([stack, (target - stack.sum(dim=0))[None]])
            labels.append("remainder")
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        stack = stack.squeeze(-1) if squeeze else stack
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
    ) -> Float[Tensor, "component ..."] | tuple[Tensor, list[str]]:  # [component *batch_and_pos d_model or projections]
        """The residual stream that `layer` reads, cut into every head, every neuron (or, with
        expand_neurons=False, every MLP), embed, pos_embed and "bias", in that order, as in
        TransformerLens. They sum to resid_pre of `layer` (resid_mid with mlp_input; the final
        stream for layer = n_layers). "bias" is every b_O before (with mlp_input, layer's own
        too) and, when neurons are expanded, every b_out: what no head or neuron carries.
        project_output_onto and apply_ln are as in stack_neuron_results.
        """
        check_flags(mlp_input=mlp_input, expand_neurons=expand_neurons, apply_ln=apply_ln, return_labels=return_labels)
        layer = self._layer(layer, mlp_input=mlp_input)
        pos_slice = self._positions(pos_slice)
        project, squeeze = self._projection(project_output_onto)
        folded = apply_ln and project is not None

        def finish(stack: Tensor) -> Tensor:  # the per-component LayerNorm, then the projection, when folded
            if folded:
                stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
            return stack if project is None else _project(stack, project)

        parts, labels = [], []
        if layer + int(mlp_input) > 0:  # the heads of layer itself write into resid_mid
            heads, head_labels = self.stack_head_results(
                layer + int(mlp_input), return_labels=True, pos_slice=pos_slice
            )
            parts.append(finish(heads))
            labels += head_labels
        if layer > 0 and expand_neurons:
            neurons, neuron_labels = self.stack_neuron_results(
                layer, pos_slice, return_labels=True, apply_ln=folded, project_output_onto=project, mlp_input=mlp_input
            )
            parts.append(neurons)
            labels += neuron_labels
        elif layer > 0:
            mlps, mlp_labels = self.decompose_resid(
                layer, mlp_input, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
            )
            parts.append(finish(mlps))
            labels += mlp_labels
        embed = pos_slice.apply(self["hook_embed"], dim=-2)[None]
        bias = torch.zeros_like(embed) + self.model.accumulated_bias(
            layer, mlp_input, include_mlp_biases=expand_neurons
        )
        for name, part in [("embed", embed), ("pos_embed", pos_slice.apply(self["hook_pos_embed"], dim=-2)[None]),
                           ("bias", bias)]:  # fmt: skip
            parts.append(finish(part))
            labels.append(name)
        stack = torch.cat(parts)
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        stack = stack.squeeze(-1) if squeeze else stack
        return (stack, labels) if return_labels else stack

    def _projection(self, directions: Tensor | None) -> tuple[Tensor | None, bool]:
        """project_output_onto as [d_model n_outputs], and whether it was one direction (to squeeze)."""
        if directions is None:
            return None, False
        d_model = self.model.cfg.d_model
        if not isinstance(directions, Tensor) or directions.ndim not in (1, 2) or directions.shape[0] != d_model:
            shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
            raise ValueError(
                f"project_output_onto must be a [d_model={d_model}] or [d_model={d_model}, n_outputs] tensor, got {shape}"
            )
        return (directions[:, None], True) if directions.ndim == 1 else (directions, False)

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "component *batch_and_pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[Tensor, "component *batch_and_pos_out d_model"]:  # batch_slice may shorten the batch
        """Centre every component and divide by the cached LayerNorm scale of the stream it is part of.

        The LayerNorm is ln_final for layer = n_layers (or None), else blocks[layer].ln1 (ln2 with
        mlp_input). Because the scale is the one of the real forward pass, the results still add
        up: the sum of a full decomposition equals that LayerNorm's hook_normalized.

        As in TransformerLens: pos_slice says which positions the stack holds (it is applied to
        the cached scale only); batch_slice is applied to both, the stack's batch axis being its
        second (has_batch_dim=False: it has none). recompute_ln=True with layer = n_layers runs
        ln_final itself (w and b included) on each component, with the component's own statistics;
        with another layer it is refused (TransformerLens ignores it there, and divides by the cached scale).
        A stack whose batch and positions are not the sliced scale's is refused, where TransformerLens
        broadcasts (a stack of one sequence came back with the batch's size).
        """
        check_flags(mlp_input=mlp_input, has_batch_dim=has_batch_dim, recompute_ln=recompute_ln)
        layer = self._layer(layer, mlp_input=mlp_input)
        if recompute_ln and layer != self.n_layers:
            raise ValueError(
                f"recompute_ln runs ln_final, which reads the final stream: pass layer=None (or -1, or "
                f"n_layers={self.n_layers}), not {layer}"
            )
        given_batch_slice, batch_slice = batch_slice, _as_slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln:
            flat = einops.rearrange(residual_stack, "... d_model -> (...) 1 d_model")  # ln_final's [batch pos d_model]
            return self.model.ln_final(flat).reshape(residual_stack.shape)
        scale = self._ln_scale(layer, mlp_input, self._positions(pos_slice), batch_slice)
        if residual_stack.shape[1:-1] != scale.shape[:-1]:
            # Else broadcasting: a stack of one sequence against a batch's scales came back with
            # the batch's size, and positions that did not line up raised torch's size error.
            raise ValueError(
                f"residual_stack's {tuple(residual_stack.shape[1:-1])} (its axes between component and "
                f"d_model) are not the cached scale's {tuple(scale.shape[:-1])} at pos_slice={_spelled(pos_slice)!r}, "
                f"batch_slice={_spelled(given_batch_slice)!r}: pass the pos_slice and "
                f"batch_slice the stack was cut with"
            )
        residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        return residual_stack / scale

    def _ln_scale(
        self, layer: int, mlp_input: bool, pos_slice: Slice, batch_slice: Slice | None = None
    ) -> Float[Tensor, "*batch_and_pos 1"]:
        """The cached scale of the LayerNorm that reads the stream into `layer` (n_layers: ln_final)."""
        if layer == self.n_layers:
            scale = self["scale"]
        else:
            scale = self["scale", layer, "ln2" if mlp_input else "ln1"]
        if scale.ndim == (4 if self.has_batch_dim else 3):
            # ln1 ran on per-head copies of the stream (set_use_split_qkv_input or set_use_attn_in).
            # Unpatched, every head's copy has the same scale; a patched copy has its own, and
            # then no one scale is the stream's.
            if not torch.equal(scale, scale[..., :1, :].expand_as(scale)):
                raise ValueError(
                    f"layer {layer}'s ln1 scale differs between heads in this cache (a run with a per-head "
                    f"input patched), so it is no one scale of the residual stream to divide by"
                )
            scale = scale[..., 0, :]
        scale = pos_slice.apply(scale, dim=-2)
        if self.has_batch_dim and batch_slice is not None:
            scale = batch_slice.apply(scale, dim=0)
        return scale

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "component *batch_and_pos d_model"],
        tokens: TokenChoice,
        incorrect_tokens: TokenChoice | None = None,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "component ..."]:
        """Each component's direct effect on the logit of `tokens` (less that of `incorrect_tokens`),
        as TransformerLens's logit_attrs: apply_ln_to_stack(layer=None) of the stack, dotted with
        W_U[:, tokens].

        tokens, as TransformerLens takes them: one token (an int, a 0-d tensor, or a str that is one
        token), a [batch] tensor (one per sequence, for every position kept; a 1-D tensor of another
        length is one token per position), or [batch pos] (one per sequence and position).
        incorrect_tokens has the same form. pos_slice, batch_slice and has_batch_dim are
        apply_ln_to_stack's.

        ln_final's w and b are not in it, nor b_U: on a model processed with process_weights (which
        folds w into W_U and b into b_U) a full decomposition's attributions sum to the logits less
        b_U[tokens] (tested). Unprocessed, they leave w out, as TransformerLens warns;
        direct_logit_attribution is exact on either.
        """
        check_flag("has_batch_dim", has_batch_dim)
        directions = residual_directions(self.model, tokens, "tokens")
        if incorrect_tokens is not None:
            incorrect = residual_directions(self.model, incorrect_tokens, "incorrect_tokens")
            if incorrect.shape != directions.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(directions.shape[:-1])} "
                    f"and {tuple(incorrect.shape[:-1])}"
                )
            directions = directions - incorrect
        batch_slice = _as_slice(batch_slice)
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        per_sequence = directions.ndim == 2 and scaled.ndim == 4 and directions.shape[0] == scaled.shape[1]
        if has_batch_dim and batch_slice.mode != "int" and per_sequence:
            # One token per sequence: the same for each of its positions, not one per position.
            directions = einops.rearrange(directions, "batch d_model -> batch 1 d_model")
        return (scaled * directions).sum(dim=-1)

    @torch.no_grad()
    def logit_lens(self, incl_mid: bool = False) -> "LogitLens":
        """The logit lens of this cache's run, with no new run (TransformerLens 4's cache.logit_lens,
        returning a LogitLens): each residual stream of accumulated_resid, resid_mid too with
        incl_mid, through ln_final with its own statistics and the unembedding. The last entry
        equals the run's logits. A cache without its batch axis (remove_batch_dim) gives batch 1.
        """
        check_flag("incl_mid", incl_mid)  # a str such as "no" would be truthy
        stack, labels = self.accumulated_resid(incl_mid=incl_mid, apply_ln=True, return_labels=True)
        if not self.has_batch_dim:
            stack = einops.rearrange(stack, "component pos d_model -> component 1 pos d_model")
        flat = einops.rearrange(stack, "component batch pos d_model -> (component batch) pos d_model")
        logits = einops.rearrange(
            self.model.unembed(flat),
            "(component batch) pos d_vocab -> component batch pos d_vocab",
            component=len(labels),
        )
        return LogitLens(logits, labels)


def residual_directions(
    model: Transformer, tokens: TokenChoice, name: str = "tokens"
) -> Float[Tensor, "*token_shape d_model"]:
    """W_U's columns of `tokens` (model.tokens_to_residual_directions): [d_model] for one token (an
    id, a str of one token, a one-element tensor), else the tokens' shape + [d_model]. `name` is
    the argument's, for the messages."""
    check_model(model)
    if isinstance(tokens, str):
        try:
            tokens = to_single_token(tokens)
        except ValueError as e:
            raise ValueError(f"{name}: {e}; give one token, or ids") from None
    if isinstance(tokens, bool) or not isinstance(tokens, (int, Tensor)):
        raise TypeError(f"{name} must be a token id, a str of one token or a tensor of ids, got {tokens!r}")
    ids = torch.as_tensor(tokens)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim > 2:
        raise ValueError(f"{name} must have at most 2 axes ([batch pos]), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    _check_id_range(name, ids, model.cfg.d_vocab)
    W_U = model.unembed.W_U
    if ids.numel() == 1:  # one token, in any shape: [d_model], as TransformerLens
        return W_U[:, int(ids.reshape(()))]
    return einops.rearrange(W_U[:, ids.to(W_U.device)], "d_model ... -> ... d_model")


def _promoted(*tensors: Tensor) -> list[Tensor]:
    """The tensors in their common dtype, for a product: matmul and einsum refuse mixed dtypes,
    which meet here when a stack divided by a LayerNorm's float32 scale meets a bf16 model's
    weights or directions (model.W_U[:, ids]), or a cache made under autocast (bf16 z) meets the
    float32 model's W_O."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return [t.to(dtype) for t in tensors]


def _project(x: Tensor, directions: Float[Tensor, "d_model n_outputs"]) -> Tensor:
    x, directions = _promoted(x, directions)
    return x @ directions


def _check_picks(name: str, given: object, picks: Slice, n: int, what: str) -> None:
    """Refuse a slice that indexes past n entries or picks none, naming it as the user gave it:
    torch's IndexError named neither the argument nor the axis, and a range past the end gave
    empty results."""
    try:
        picked = picks.apply(torch.arange(n), dim=0).numel()
    except IndexError:
        raise ValueError(
            f"{name}={given!r} indexes past this cache's {n} {what} (0 to {n - 1}, or -{n} to -1)"
        ) from None
    if picked == 0:
        raise ValueError(f"{name}={given!r} picks none of this cache's {n} {what}")


def _spelled(pos_slice: "PosSlice") -> object:
    """A slice argument as the user wrote it, for messages: a Slice (made from one) by its slice."""
    return pos_slice.slice if isinstance(pos_slice, Slice) else pos_slice


def _as_slice(pos_slice: "PosSlice") -> Slice:
    """TransformerLens's Slice of an int, (start, stop[, step]), slice, list, array or None."""
    return pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)


# --- logit lens --------------------------------------------------------------------------------


@dataclass
class LogitLens:
    logits: Float[Tensor, "component batch pos d_vocab"]  # ln_final + unembed of each residual stream
    labels: list[str]  # "0_pre" ("0_mid" with incl_mid) ... "{n_layers-1}_pre", "final_post"

    def log_probs_of(self, targets: Int[Tensor, "batch target_pos"]) -> Float[Tensor, "component batch target_pos"]:
        """log-probability each layer's reading at position i gives to targets[:, i].

        targets may be shorter than the lens: tokens[:, 1:], the actual next tokens, scores every
        position but the last, which has no next token.
        """
        # Checked here: torch's gather named a dimension ("index 99 is out of bounds for dimension 3") or a dtype.
        if not isinstance(targets, Tensor) or targets.dtype == torch.bool or targets.is_floating_point():
            got = f"a {targets.dtype} tensor" if isinstance(targets, Tensor) else type(targets).__name__
            raise TypeError(f"targets must be a tensor of token ids, got {got}")
        batch, n_pos, d_vocab = self.logits.shape[1:]
        if targets.ndim != 2 or targets.shape[0] != batch or not 1 <= targets.shape[1] <= n_pos:
            raise ValueError(
                f"targets must have shape [batch={batch}, target_pos <= {n_pos}] (one id per position read), "
                f"got {tuple(targets.shape)}"
            )
        _check_id_range("targets", targets, d_vocab)
        log_probs = at_least_float32(self.logits).log_softmax(dim=-1)
        index = einops.repeat(targets.long(), "batch pos -> component batch pos 1", component=log_probs.shape[0])
        return log_probs.gather(-1, index).squeeze(-1)


@torch.no_grad()
def logit_lens(model: Transformer, tokens: Int[Tensor, "batch pos"], incl_mid: bool = False) -> LogitLens:
    """The next-token logits read off the residual stream before every block and after the last
    (and between each block's attention and MLP, with incl_mid).

    Each residual stream goes through ln_final (with its own statistics) and the unembedding, as
    if the remaining blocks were skipped. The last entry equals the model's logits. A cache at
    hand gives the same without a new run: cache.logit_lens().
    """
    check_model(model)
    check_flag("incl_mid", incl_mid)  # before the run
    kept = ("resid_pre", "resid_post", "resid_mid") if incl_mid else ("resid_pre", "resid_post")
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(kept))
    return cache.logit_lens(incl_mid)


# --- how a prompt's answer fares -----------------------------------------------------------------


@dataclass(frozen=True)
class TokenScore:
    token: str  # as to_str_tokens gives it
    rank: int  # 0 for the most likely next token: how many tokens have a larger logit
    logit: float
    prob: float


@dataclass(frozen=True)
class PromptTest:
    """What test_prompt found; str() lays it out as TransformerLens's test_prompt prints it."""

    prompt_str_tokens: list[str]
    answer_str_tokens: list[list[str]]  # each answer's tokens, all of them (several answers: only the first is scored)
    answers: list[list[TokenScore]]  # per answer position, each answer's token there
    top: list[list[TokenScore]]  # per answer position, the top_k next tokens (of the first answer's run)

    @property
    def ranks(self) -> list[list[tuple[str, int]]]:
        """Per answer position, (token, rank) of each answer's token there."""
        return [[(score.token, score.rank) for score in position] for position in self.answers]

    def __str__(self) -> str:
        several = len(self.answer_str_tokens) > 1
        lines = [f"Tokenized prompt: {self.prompt_str_tokens}"]
        lines.append(
            f"Tokenized answers: {self.answer_str_tokens}"
            if several
            else f"Tokenized answer: {self.answer_str_tokens[0]}"
        )
        for answers, top in zip(self.answers, self.top, strict=True):
            lines.append(f"Performance on answer token{'s' if several else ''}:")
            lines += [
                f"Rank: {a.rank: <8} Logit: {a.logit:5.2f} Prob: {a.prob:6.2%} Token: |{a.token}|" for a in answers
            ]
            lines += [
                f"Top {i}th token. Logit: {t.logit:5.2f} Prob: {t.prob:6.2%} Token: |{t.token}|"
                for i, t in enumerate(top)
            ]
        ranks = self.ranks if several else [position[0] for position in self.ranks]
        lines.append(f"Ranks of the answer tokens: {ranks}")
        return "\n".join(lines)


@torch.no_grad()
def test_prompt(
    model: Transformer,
    prompt: str,
    answer: str | Sequence[str],
    *,
    prepend_space_to_answer: bool = True,
    prepend_bos: bool = True,
    top_k: int = 10,
) -> PromptTest:
    """How likely the model finds `answer` after `prompt`, as TransformerLens's test_prompt (same
    arguments but the model first), returned rather than printed: print(test_prompt(...)) prints
    what TransformerLens prints.

    A one-string answer may take several tokens: each is scored at its position, the earlier answer
    tokens given (teacher forcing). Several answers are scored by their first tokens, as
    alternatives for the next token. A space is put before an answer that has none, unless
    prepend_space_to_answer=False. prepend_bos puts <|endoftext|> before the prompt (TransformerLens's
    default for GPT-2).

    A padded vocabulary's unused ids (50257 and up, see gpt2_small.training.PADDED_VOCAB) have no
    text and are left out, as sampling leaves them out: ranks, probabilities and the top_k are
    those of GPT-2's 50257 tokens.
    """
    check_model(model)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    answers = [answer] if isinstance(answer, str) else list(answer) if isinstance(answer, Sequence) else None
    if not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"answer must be a non-empty str or a non-empty list of them, got {answer!r}")
    d_vocab = model.cfg.d_vocab
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= min(d_vocab, GPT2_VOCAB):
        allowed = (
            f"[0, d_vocab={d_vocab}]"
            if d_vocab <= GPT2_VOCAB
            else f"[0, {GPT2_VOCAB}]: ids from {GPT2_VOCAB} up of d_vocab={d_vocab} are padding, with no text"
        )
        raise ValueError(f"top_k must be an int in {allowed}, got {top_k!r}")
    if check_flag("prepend_space_to_answer", prepend_space_to_answer):  # "no" would be truthy
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = to_tokens(prompt, prepend_bos=prepend_bos, device=model.device)
    answer_ids = [to_tokens(a)[0] for a in answers]
    # Every token of each answer, as TransformerLens prints them, even where only the first is scored.
    answer_str_tokens = [to_str_tokens(ids) for ids in answer_ids]
    if len(answers) > 1:
        answer_ids = [ids[:1] for ids in answer_ids]  # alternatives for one next token
    answer_ids = torch.stack(answer_ids).to(model.device)
    tokens = torch.cat([prompt_tokens.expand(len(answers), -1), answer_ids], dim=1)
    logits = model(tokens).float()
    n_prompt = prompt_tokens.shape[1]
    scores, top = [], []
    for index in range(n_prompt, tokens.shape[1]):
        next_logits = mask_padding_ids(logits[:, index - 1])  # the model predicts the next token
        probs = next_logits.softmax(dim=-1)
        position = []
        for row, target in enumerate(tokens[:, index].tolist()):
            rank = int((next_logits[row] > next_logits[row, target]).sum())
            position.append(
                TokenScore(
                    answer_str_tokens[row][index - n_prompt],
                    rank,
                    float(next_logits[row, target]),
                    float(probs[row, target]),
                )
            )
        scores.append(position)
        best = next_logits[0].topk(top_k).indices.tolist()
        top.append(
            [
                TokenScore(to_string([i]), rank, float(next_logits[0, i]), float(probs[0, i]))
                for rank, i in enumerate(best)
            ]
        )
    return PromptTest(to_str_tokens(prompt_tokens[0]), answer_str_tokens, scores, top)


test_prompt.__test__ = False  # a TransformerLens name, not a test: pytest must not collect it where imported


# --- direct logit attribution ------------------------------------------------------------------


@dataclass
class LogitAttribution:
    contributions: Float[Tensor, "component batch"]  # each component's share of the logit difference
    labels: list[str]  # "embed", "pos_embed", "L{i}H{h}", "L{i} b_O", "L{i} MLP"
    bias: Float[Tensor, " batch"]  # what no component carries: ln_final.b and b_U along the direction
    logit_diff: Float[Tensor, " batch"]  # the model's logit[correct] - logit[incorrect]

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k components with the largest mean |contribution|, with their mean contribution."""
        mean = self.contributions.mean(dim=1)
        order = mean.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(mean[i])) for i in order]


def _token_ids(name: str, ids: int | Tensor, d_vocab: int, batch: int) -> Int[Tensor, " batch"]:
    """`ids` (one id, or one per batch item) as a [batch] tensor, or a ValueError naming what is wrong."""
    if isinstance(ids, str):  # torch.as_tensor would say only "new(): invalid data type 'str'"
        raise TypeError(
            f"{name} must be a token id (int) or a tensor of ids, got the str {ids!r}; "
            f"pass to_single_token({ids!r}), which refuses text of several tokens"
        )
    ids = torch.as_tensor(ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must be token ids (ints), got dtype {ids.dtype}")
    if ids.ndim > 1 or (ids.ndim == 1 and ids.shape[0] != batch):
        raise ValueError(f"{name} must be one token id or one per batch item ({batch}), got shape {tuple(ids.shape)}")
    _check_id_range(name, ids, d_vocab)
    return ids.long().expand(batch)


def _check_id_range(name: str, ids: Tensor, d_vocab: int) -> None:
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= d_vocab:
        raise ValueError(f"{name}: token id {low if low < 0 else high} is outside [0, d_vocab={d_vocab})")


@torch.no_grad()
def direct_logit_attribution(
    model: Transformer,
    cache: ActivationCache,
    correct: int | Int[Tensor, ""] | Int[Tensor, " batch"],
    incorrect: int | Int[Tensor, ""] | Int[Tensor, " batch"],
    pos: int = -1,
) -> LogitAttribution:
    """How much each head, MLP and embedding writes directly onto logit[correct] - logit[incorrect] at `pos`.

    The final residual stream is the sum of embed, pos_embed, every head's z @ W_O, every
    layer's b_O and every MLP's output. ln_final is linear once its scale is fixed (the cached
    one), so each component's contribution is apply_ln_to_stack(component) @ (w * direction),
    direction = W_U[:, correct] - W_U[:, incorrect]. The contributions sum exactly to the logit
    difference minus `bias` = ln_final.b @ direction + b_U[correct] - b_U[incorrect].
    """
    check_model(model)
    if not isinstance(cache, ActivationCache):  # a plain dict (return_cache_object=False) lacks its helpers
        raise TypeError(
            f"cache must be the ActivationCache that model.run_with_cache(tokens) returns, got {type(cache).__name__}"
        )
    if not cache.has_batch_dim:
        raise ValueError(
            "direct_logit_attribution needs the cache's batch axis; run_with_cache without remove_batch_dim=True"
        )
    final = cache["resid_post", model.cfg.n_layers - 1]
    batch, n_pos = final.shape[:2]
    if isinstance(pos, bool) or not isinstance(pos, int) or not -n_pos <= pos < n_pos:
        raise ValueError(f"pos={pos!r} is outside the cache's {n_pos} positions ([{-n_pos}, {n_pos}))")
    correct = _token_ids("correct", correct, model.cfg.d_vocab, batch).to(final.device)
    incorrect = _token_ids("incorrect", incorrect, model.cfg.d_vocab, batch).to(final.device)
    logits = model.unembed(model.ln_final(einops.rearrange(final[:, pos], "batch d_model -> batch 1 d_model")))[:, 0]
    n_heads = model.cfg.n_heads
    # In float32 for a bf16 or fp16 model, as the stacked components come from apply_ln_to_stack.
    W_U, b_U = at_least_float32(model.unembed.W_U), at_least_float32(model.unembed.b_U)
    ln_w, ln_b = at_least_float32(model.ln_final.w), at_least_float32(model.ln_final.b)
    direction = W_U[:, correct] - W_U[:, incorrect]  # [d_model batch]
    heads, head_labels = cache.stack_head_results(return_labels=True)
    parts, labels = [cache["hook_embed"], cache["hook_pos_embed"]], ["embed", "pos_embed"]
    for i in range(model.cfg.n_layers):
        parts += list(heads[i * n_heads : (i + 1) * n_heads])
        labels += head_labels[i * n_heads : (i + 1) * n_heads]
        parts.append(torch.zeros_like(final) + model.blocks[i].attn.b_O)
        labels.append(f"L{i} b_O")
        parts.append(cache["mlp_out", i])
        labels.append(f"L{i} MLP")
    stack = at_least_float32(cache.apply_ln_to_stack(torch.stack(parts))[:, :, pos])  # [component batch d_model]
    w_direction = ln_w[:, None] * direction  # ln_final's w folded into the direction
    contributions = einops.einsum(stack, w_direction, "component batch d_model, d_model batch -> component batch")
    bias = einops.einsum(ln_b, direction, "d_model, d_model batch -> batch") + b_U[correct] - b_U[incorrect]
    logits = at_least_float32(logits)
    logit_diff = logits.gather(1, correct[:, None]).squeeze(1) - logits.gather(1, incorrect[:, None]).squeeze(1)
    return LogitAttribution(contributions, labels, bias, logit_diff)


# --- activation patching -----------------------------------------------------------------------


def patched_logits(
    model: Transformer,
    tokens: Int[Tensor, "batch pos"],
    source: ActivationCache | dict[str, Tensor],
    hook_name: str | tuple,
    pos: int | None = None,
    head: int | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Run `tokens` with activation `hook_name` replaced by source[hook_name] (at one position / head if given).

    head needs a hook with an n_heads axis (q, k, v, z, attn_scores, pattern, and the optional
    result, attn_in, q_input, k_input, v_input, once the model has them). For attn_scores and
    pattern, pos is the query position (every key of it is patched). hook_name may be any spelling
    act_name takes ("blocks.0.attn.hook_z", "z0"), or a cache key's tuple, ("z", 0).
    """
    check_model(model)
    # The full name, so that a plain dict source, and the hook itself, get it
    hook_name = act_name(*hook_name) if isinstance(hook_name, tuple) else act_name(hook_name)
    clean = source[hook_name]
    if head is not None and not hook_name.endswith(tuple(f".{_PER_LAYER_HOOKS[h]}" for h in _HEAD_HOOKS)):
        # Indexing [:, :, head] of a [batch pos d_model] activation would patch one residual dimension.
        raise ValueError(f"head={head} needs a hook with a head axis, one of {_HEAD_HOOKS}; got {hook_name!r}")
    # Before the run: inside the hook, torch's IndexError named a dimension, not the argument.
    n_heads, n_pos = model.cfg.n_heads, tokens.shape[-1]
    for arg, value, size, why in (
        ("head", head, n_heads, f"the model has n_heads={n_heads}"),
        ("pos", pos, n_pos, f"the tokens have {n_pos} positions"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{arg} must be an int or None, got {value!r}")
        if not -size <= value < size:
            raise ValueError(f"{arg}={value} is outside [{-size}, {size}): {why}")

    def patch(activation: Tensor, hook) -> Tensor:
        if clean.shape != activation.shape:
            raise ValueError(
                f"cannot patch {hook_name}: source {tuple(clean.shape)} vs this run {tuple(activation.shape)}; "
                f"the two runs need the same batch size and sequence length"
            )
        if head is None and pos is None:
            return clean.clone()
        activation = activation.clone()
        every = slice(None)
        if hook_name.endswith(("attn_scores", "pattern")):  # [batch n_heads query_pos key_pos]; pos is the query's
            where = (every, every if head is None else head, every if pos is None else pos)
        else:  # [batch pos ...], with n_heads next for q, k, v and z
            where = (every, every if pos is None else pos) + (() if head is None else (head,))
        activation[where] = clean[where]
        return activation

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, patch)])


def _check_by(by: str, context: str = "") -> None:
    if by not in ("position", "head"):
        raise ValueError(f"by must be 'position' or 'head'{context}, got {by!r}")


@torch.no_grad()
def activation_patching(
    model: Transformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "corrupted_batch corrupted_pos"],  # checked below, with a clearer message
    metric: Callable[[Tensor], Tensor],
    hook: str | None = None,
    by: str = "position",
    progress: bool = True,
) -> Float[Tensor, "n_layers pos"] | Float[Tensor, "n_layers n_heads"]:
    """Patch `hook` of every layer from the clean run into the corrupted run, one piece at a time.

    by="position": one position of each layer's `hook` (default "resid_pre") per run -> [n_layers pos].
    by="head": one head (all positions) of each layer's `hook` (default "z") -> [n_layers n_heads].
    metric maps the patched logits [batch pos d_vocab] to a scalar (e.g. a logit difference,
    normalised so that clean = 1 and corrupted = 0).
    """
    check_model(model)
    _check_by(by)
    check_flag("progress", progress)
    if not callable(metric):
        raise TypeError(f"metric must be a function of the patched logits, got {type(metric).__name__}")
    model.check_tokens(clean_tokens)
    model.check_tokens(corrupted_tokens)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens {tuple(corrupted_tokens.shape)} "
            f"must have the same shape"
        )
    if hook is None:
        hook = "resid_pre" if by == "position" else "z"
    if hook not in _PER_LAYER_HOOKS:
        # A full name ("blocks.0.hook_resid_pre") would pass act_name unchanged for every layer, and
        # each row of the grid would then patch that one layer.
        short = [k for k, v in _PER_LAYER_HOOKS.items() if isinstance(hook, str) and hook.endswith(f".{v}")]
        raise ValueError(
            f"hook must be a per-layer short name, one of {sorted(_PER_LAYER_HOOKS)}: activation_patching patches "
            f"it in each layer in turn; got {hook!r}" + (f", so pass hook={short[0]!r}" if short else "")
        )
    if by == "head" and hook not in _HEAD_HOOKS:
        raise ValueError(f"by='head' needs a hook with a head axis, one of {_HEAD_HOOKS}; got {hook!r}")
    n_layers = model.cfg.n_layers
    names = [act_name(hook, layer) for layer in range(n_layers)]
    # A list, not a filter function: an optional hook that is off is then refused, naming its setter.
    _, clean_cache = model.run_with_cache(clean_tokens, names_filter=names)
    width = clean_tokens.shape[1] if by == "position" else model.cfg.n_heads
    result = torch.zeros(n_layers, width)
    cells = [(layer, i) for layer in range(n_layers) for i in range(width)]
    for layer, i in tqdm(cells, desc=f"patching {hook} by {by}", disable=not progress, leave=False):
        where = {"pos": i} if by == "position" else {"head": i}
        logits = patched_logits(model, corrupted_tokens, clean_cache, names[layer], **where)
        value = metric(logits)
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"metric must return a scalar, got a tensor of shape {tuple(value.shape)}")
        result[layer, i] = float(value)
    return result


# --- induction heads ---------------------------------------------------------------------------


def repeated_tokens(
    d_vocab: int, seq_len: int, batch: int, seed: int = 0, bos: int | None = None
) -> Int[Tensor, "batch pos"]:
    """[bos] + r + r for `batch` random sequences r of seq_len distinct tokens (no repeats inside r)."""
    # A negative seq_len sliced all but the last tokens off each half, so r + r was no repeat.
    for name, value in (("d_vocab", d_vocab), ("seq_len", seq_len), ("batch", batch)):
        check_count(name, value, 1)
    check_seed(seed)
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or not 0 <= bos < d_vocab):
        raise ValueError(f"bos must be None or a token id in [0, d_vocab={d_vocab}), got {bos!r}")
    vocab = min(d_vocab, EOT_ID)  # real tokens only, never <|endoftext|> or padding ids
    if seq_len > vocab:
        raise ValueError(f"seq_len={seq_len} exceeds the {vocab} distinct tokens available")
    gen = torch.Generator().manual_seed(seed)
    half = torch.rand(batch, vocab, generator=gen).argsort(dim=-1)[:, :seq_len]
    tokens = torch.cat([half, half], dim=1)
    if bos is not None:
        tokens = torch.cat([torch.full((batch, 1), bos), tokens], dim=1)
    return tokens


@torch.no_grad()
def induction_score(
    model: Transformer, seq_len: int = 50, batch: int = 8, seed: int = 0, bos: int | None | str = "auto"
) -> Float[Tensor, "n_layers n_heads"]:
    """Mean attention of each head, in the repeated half, to the token after the previous occurrence.

    On [bos] + r + r, a query at the second copy's position j attends (if an induction head) to
    the first copy's position j + 1, seq_len - 1 positions back. 1 = always, ~1/pos = uniform.
    bos="auto" prepends <|endoftext|> when the vocabulary has it (as TransformerLens does).
    """
    check_model(model)
    check_count("seq_len", seq_len, 2)  # with 1, "the token after the first occurrence" is the query itself
    check_count("batch", batch, 1)
    if bos == "auto":
        bos = EOT_ID if model.cfg.d_vocab > EOT_ID else None
    elif bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):  # 1.5 was named as "tokens"' dtype
        raise TypeError(f"bos must be a token id, None or 'auto', got {bos!r}")
    offset = 0 if bos is None else 1
    if offset + 2 * seq_len > model.cfg.n_ctx:
        raise ValueError(
            f"2 * seq_len + {offset} = {offset + 2 * seq_len} exceeds n_ctx={model.cfg.n_ctx}; "
            f"pass seq_len <= {(model.cfg.n_ctx - offset) // 2}"
        )
    tokens = repeated_tokens(model.cfg.d_vocab, seq_len, batch, seed, bos).to(model.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        pattern = cache[act_name("pattern", layer)]  # [batch n_heads query_pos key_pos]
        stripe = pattern.diagonal(offset=-(seq_len - 1), dim1=-2, dim2=-1)  # query q, key q - seq_len + 1
        # stripe[..., i] is query i + seq_len - 1; the repeated half's queries start at offset + seq_len.
        scores[layer] = stripe[..., offset + 1 :].float().mean(dim=(0, 2)).cpu()
    return scores


def top_heads(scores: Float[Tensor, "n_layers n_heads"], k: int = 5) -> list[tuple[str, float]]:
    """The k highest-scoring heads as ("L{layer}H{head}", score); every head if there are fewer than k.

    NaN scores (an ablated head's composition, 0/0) rank last, where torch's sort puts them first.
    """
    check_count("k", k, 1)  # a negative k sliced off the lowest heads
    flat = scores.flatten()
    ranked = flat.nan_to_num(nan=-torch.inf).argsort(descending=True, stable=True)
    order = torch.cat([ranked[~flat[ranked].isnan()], ranked[flat[ranked].isnan()]])[:k]
    n_heads = scores.shape[1]
    return [(f"L{int(i) // n_heads}H{int(i) % n_heads}", float(flat[i])) for i in order]


# --- plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # A bare Figure (no pyplot): no global state, no GUI backend, safe in scripts and threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _finish(fig, path: str | Path | None):
    if path is not None:
        import matplotlib

        spelled = path
        path = user_path(path, "path")
        # savefig writes "plots.png" for an existing directory "plots" (or "plots/"), beside it.
        if path.is_dir() or str(spelled).endswith(("/", os.sep)):
            raise ValueError(
                f"path {str(spelled)!r} is a directory; name the image file, such as {path / 'figure.png'}"
            )
        if not path.suffix:  # what savefig would add, said here so the log names the file written
            path = path.with_name(f"{path.name}.{matplotlib.rcParams['savefig.format']}")
        formats = fig.canvas.get_supported_filetypes()
        if path.suffix[1:].lower() not in formats:  # before the mkdir below, which would then stay empty
            raise ValueError(f"path {str(path)!r}: matplotlib writes no {path.suffix!r}; use one of {sorted(formats)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        logger.info("wrote %s", path)
    return fig


def _check_values(values: object, axes: str, name: str, hint: str) -> None:
    # Outside the test suite's jaxtyping checks, a tensor with its batch axis still on reached
    # imshow, which fails naming neither the argument nor its axes, or with 3 or 4 columns in the
    # last axis draws the values as RGB colours.
    if not isinstance(values, Tensor) or values.ndim != len(axes.split()):
        got = f"shape {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a tensor [{axes}], got {got}; {hint}")
    if values.numel() == 0:  # else an empty picture, or an error from matplotlib that names neither
        raise ValueError(f"{name} [{axes}] has an empty axis (shape {tuple(values.shape)}); there is nothing to draw")


def _colormap(name: str, values: np.ndarray, title: str):
    """matplotlib's colormap `name`, with cells that are not finite drawn grey.

    A zero-ablated head's composition scores are 0/0 and a metric can divide by zero; by default
    such cells are left blank, in the colour of 0 on a scale centred there.
    """
    import matplotlib

    if bad := int((~np.isfinite(values)).sum()):
        logger.warning("%s: %d of %d values are not finite (NaN or inf), drawn grey", title, bad, values.size)
    return matplotlib.colormaps[name].with_extremes(bad="0.6")


def _finite_max(values: np.ndarray) -> float:
    """The largest finite |value|, 0 if there is none: one NaN would otherwise become the scale's end."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def _check_labels(labels: Sequence[str] | None, count: int, name: str, of: str) -> None:
    # matplotlib's own error ("The number of FixedLocator locations (6), usually from a call to
    # set_ticks, does not match the number of labels (2)") names neither the argument nor the axis.
    if labels is not None and len(labels) != count:
        raise ValueError(f"{name} has {len(labels)} labels for {count} {of}")


_LABELLED = 60  # rows or columns of a heatmap that each get a label and a full-size cell


def _ticks(n: int) -> list[int]:
    """Every index below n, or every k-th when there are more than _LABELLED."""
    return list(range(0, n, math.ceil(n / _LABELLED)))


def _heatmap(
    values: Tensor,
    *,
    cmap: str,
    center: bool,
    label: str,
    title: str,
    path: str | Path | None,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    annotate: bool = False,
    value_range: tuple[float, float] | None = None,
):
    """One labelled heatmap of a 2-D tensor (rows down, columns across) in a Figure sized to it.

    The colour scale is symmetric about 0 with `center`, `value_range` if given, else the data's.
    """
    values = values.detach().float().cpu().numpy()
    rows, cols = values.shape
    # Wide enough for the columns and for the title (about 0.09 inch per character at 12 pt), up
    # to _LABELLED cells a side: past that the cells narrow and every k-th is labelled (a logit
    # lens of 1,024 positions was 361 inches wide, 36,000 pixels).
    width = max(5.0, 0.35 * min(cols, _LABELLED) + 2.5, 0.09 * len(title) + 1.0)
    fig = _figure(width, 0.35 * min(rows, _LABELLED) + 1.8)
    ax = fig.subplots()
    if center:
        limit = _finite_max(values) or 1.0
        value_range = (-limit, limit)
    low, high = value_range if value_range is not None else (None, None)
    image = ax.imshow(values, cmap=_colormap(cmap, values, title), aspect="auto", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax, label=label)
    # One tick per row and column (layers and heads are integers, never 0.5), or per k-th of many.
    x_ticks, y_ticks = _ticks(cols), _ticks(rows)
    ax.set_xticks(
        x_ticks,
        [x_labels[i] for i in x_ticks] if x_labels is not None else x_ticks,
        rotation=90 if x_labels else 0,
        fontsize=7,
    )
    ax.set_yticks(y_ticks, [y_labels[i] for i in y_ticks] if y_labels is not None else y_ticks, fontsize=7)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if annotate:
        for row in range(rows):
            for col in range(cols):
                ax.text(col, row, f"{values[row, col]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title)
    return _finish(fig, path)


def plot_attention_patterns(
    pattern: Float[Tensor, "n_heads query_pos key_pos"],
    token_labels: Sequence[str] | None = None,
    title: str = "attention patterns",
    path: str | Path | None = None,
):
    """One heatmap per head (query rows, key columns), labelled with the tokens. Returns the Figure."""
    _check_values(pattern, "n_heads query_pos key_pos", "pattern", "for one prompt pass cache['pattern', layer][i]")
    n_heads, pos = pattern.shape[0], pattern.shape[-1]
    _check_labels(token_labels, pos, "token_labels", "key positions")
    cols = min(n_heads, 4)
    rows = -(-n_heads // cols)
    fig = _figure(3.2 * cols, 3.0 * rows + 0.4)
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.axis("off")
            continue
        values = pattern[h].detach().float().cpu().numpy()
        ax.imshow(values, cmap=_colormap("Blues", values, f"{title}, head {h}"), vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        if token_labels is not None and pos <= 40:
            ax.set_xticks(range(pos), token_labels, rotation=90, fontsize=6)
            ax.set_yticks(range(pos), token_labels, fontsize=6)
        else:
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
    return _finish(fig, path)


def plot_logit_lens(
    values: Float[Tensor, "component pos"],
    layer_labels: Sequence[str],
    token_labels: Sequence[str] | None = None,
    title: str = "logit lens: log-prob of the next token",
    path: str | Path | None = None,
):
    """Heatmap of a logit-lens quantity, layers down the side, positions across. Returns the Figure."""
    _check_values(values, "component pos", "values", "for one prompt of a batch pass values[:, i]")
    _check_labels(layer_labels, values.shape[0], "layer_labels", "rows (components)")
    _check_labels(token_labels, values.shape[1], "token_labels", "positions")
    return _heatmap(values, cmap="viridis", center=False, label="log-prob", title=title, path=path,
                    x_labels=token_labels, y_labels=layer_labels)  # fmt: skip


def plot_patching(
    values: Float[Tensor, "n_layers width"],
    by: str = "position",
    token_labels: Sequence[str] | None = None,
    title: str = "activation patching",
    path: str | Path | None = None,
):
    """Heatmap of activation_patching's result (layers x positions or layers x heads). Returns the Figure."""
    _check_values(values, "n_layers width", "values", "pass activation_patching's result")
    _check_by(by, ", as given to activation_patching")
    if by == "head" and token_labels is not None:
        raise ValueError("token_labels label positions; a by='head' map has heads across (labelled by number)")
    _check_labels(token_labels, values.shape[1], "token_labels", "positions")
    x_labels = token_labels if by == "position" else None
    return _heatmap(values, cmap="RdBu_r", center=True, label="metric", title=title, path=path, x_labels=x_labels,
                    xlabel=None if x_labels is not None else by, ylabel="layer")  # fmt: skip


def plot_induction_scores(
    scores: Float[Tensor, "n_layers n_heads"], title: str = "induction score", path: str | Path | None = None
):
    """Heatmap of induction_score's result, layers x heads, each cell annotated. Returns the Figure.

    The scale is fixed to [0, 1] (the score is a fraction of attention), so that a model without
    induction heads looks empty instead of showing its noise at full contrast.
    """
    _check_values(scores, "n_layers n_heads", "scores", "pass induction_score's result")
    return _heatmap(scores, cmap="Reds", center=False, label="score", title=title, path=path, xlabel="head",
                    ylabel="layer", annotate=True, value_range=(0.0, 1.0))  # fmt: skip


def plot_composition_scores(
    scores: Float[Tensor, "n_layers n_heads n_layers n_heads"],
    mode: str = "K",
    title: str | None = None,
    path: str | Path | None = None,
):
    """Heatmap of model.all_composition_scores(mode): the earlier (writing) head down the side, the
    later (reading) head across. Returns the Figure.

    Each head is labelled while there are at most 48; beyond that (GPT-2 small has 144) each
    layer's block is labelled and lines part the layers. The scale starts at 0.
    """
    _check_values(scores, "n_layers n_heads n_layers n_heads", "scores", "pass model.all_composition_scores(mode)")
    n_layers, n_heads = scores.shape[:2]
    if tuple(scores.shape[2:]) != (n_layers, n_heads):
        raise ValueError(f"scores must be [n_layers n_heads n_layers n_heads], got shape {tuple(scores.shape)}")
    grid = einops.rearrange(scores, "layer head later_layer later_head -> (layer head) (later_layer later_head)")
    grid = grid.detach().float().cpu().numpy()
    n = n_layers * n_heads
    side = min(0.3 * n + 2.0, 11.0)
    fig = _figure(side + 1.5, side + 0.6)
    ax = fig.subplots()
    title = title if title is not None else f"{mode}-composition scores"
    image = ax.imshow(grid, cmap=_colormap("Reds", grid, title), vmin=0.0, vmax=_finite_max(grid) or 1.0)
    fig.colorbar(image, ax=ax, label=f"{mode}-composition score")
    if n <= 48:
        labels = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    else:
        middles = [layer * n_heads + (n_heads - 1) / 2 for layer in range(n_layers)]
        layer_labels = [f"L{layer}" for layer in range(n_layers)]
        ax.set_xticks(middles, layer_labels, fontsize=7)
        ax.set_yticks(middles, layer_labels, fontsize=7)
        for edge in range(1, n_layers):
            ax.axhline(edge * n_heads - 0.5, color="0.8", linewidth=0.5)
            ax.axvline(edge * n_heads - 0.5, color="0.8", linewidth=0.5)
    ax.set_xlabel(f"later head (reads through its {'QK' if mode in ('Q', 'K') else 'OV'} circuit)")
    ax.set_ylabel("earlier head (writes through its OV circuit)")
    ax.set_title(title)
    return _finish(fig, path)


__all__ = [
    "ActivationCache",
    "LogitAttribution",
    "LogitLens",
    "act_name",
    "activation_patching",
    "direct_logit_attribution",
    "induction_score",
    "logit_lens",
    "patched_logits",
    "plot_attention_patterns",
    "plot_composition_scores",
    "plot_induction_scores",
    "plot_logit_lens",
    "plot_patching",
    "repeated_tokens",
    "top_heads",
]
