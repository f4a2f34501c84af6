"""Load GPT-2 weights saved in Hugging Face's format into `solution.Transformer`.

A checkpoint is a directory holding `config.json` and `model.safetensors` (or, for older
uploads, `pytorch_model.bin`, read with `weights_only=True` so no pickled code runs), either
whole or in shards listed by a `.index.json` beside them, as save_pretrained writes a model
larger than its max_shard_size (transformers 4 did so from 5 GB: gpt2-xl in float32). The
config decides the model's shape, so gpt2, gpt2-medium, gpt2-large, gpt2-xl and any model
saved by `GPT2LMHeadModel.save_pretrained` load alike.

Hugging Face stores attention as one fused Conv1D, c_attn [d_model, 3 * d_model] applied as
x @ W; here it is split into W_Q, W_K, W_V and reshaped to TransformerLens's
[n_heads d_model d_head]. lm_head is tied to wte in GPT-2, so W_U is wte transposed unless
the checkpoint carries an lm_head.weight of its own (which it must, if its config says
tie_word_embeddings=false).

`export_hf` goes the other way: a Transformer written as GPT2LMHeadModel.save_pretrained would
write it, for Hugging Face's transformers, TransformerLens's TransformerBridge, or the Hub.
"""

import difflib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import einops
import torch
from torch import Tensor

from gpt2_small.tokenizer import EOT_ID, hf_tokenizer
from solution import (
    CHECKPOINT_CONFIG,
    Transformer,
    TransformerConfig,
    _atomic_write,
    _check_placement,
    _dense_unshared,
    _holds_training_run,
    _read_json,
    _read_safetensors,
    _training_run_hint,
    check_flag,
    check_model,
    directory_to_write,
    refuse_keywords,
    spelled_as_path,
    user_path,
)

logger = logging.getLogger(__name__)

# Short names a user types, and the hub repositories they stand for.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",  # TransformerLens's name for it
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# In Hugging Face's order of preference; each may instead be shards listed in its index.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_SUFFIX = ".index.json"
# Causal-mask buffers that older transformers versions saved with the weights; not parameters.
_IGNORED_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class WeightLoadError(ValueError):
    """A checkpoint does not hold the GPT-2 tensors this model needs, with the shapes it needs."""


def config_from_hf(hf_config: dict) -> TransformerConfig:
    """TransformerConfig for a Hugging Face GPT2Config given as its config.json dict."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be the dict of a config.json, got {type(hf_config).__name__}")
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"expected a GPT-2 checkpoint (model_type 'gpt2'), got model_type={hf_config['model_type']!r}")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={act!r} is not supported; this model implements gelu_new")
    for flag, supported in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),  # an encoder-decoder's GPT-2 half: each block also attends to an encoder
    ):
        if hf_config.get(flag, supported) != supported:
            raise ValueError(f"{flag}={hf_config[flag]!r} is not supported; GPT-2 uses {flag}={supported}")
    if missing := [key for key in ("n_embd", "n_head", "n_layer", "vocab_size") if key not in hf_config]:
        raise ValueError(f"the GPT-2 config.json lacks {', '.join(missing)}; every GPT2Config writes them")
    for key in ("n_embd", "n_head", "n_layer", "vocab_size", "n_positions", "n_ctx", "n_inner"):
        value = hf_config.get(key)
        # A quoted "768" made n_embd % n_head a str formatting ("not all arguments converted").
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"the GPT-2 config.json's {key} must be an int, got {value!r}")
    d_model, n_heads = hf_config["n_embd"], hf_config["n_head"]
    if d_model % n_heads:
        raise ValueError(f"n_embd={d_model} is not divisible by n_head={n_heads}")
    return TransformerConfig(
        d_model=d_model,
        n_layers=hf_config["n_layer"],
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=hf_config.get("n_inner") or 4 * d_model,
        d_vocab=hf_config["vocab_size"],
        n_ctx=hf_config.get("n_positions", hf_config.get("n_ctx", 1024)),
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        init_range=hf_config.get("initializer_range", 0.02),
    )


def convert_hf_state_dict(
    hf_state: dict[str, Tensor], cfg: TransformerConfig, *, tie_word_embeddings: bool = True
) -> dict[str, Tensor]:
    """Map a GPT2LMHeadModel / GPT2Model state dict to this project's parameter names and shapes.

    `tie_word_embeddings` is the checkpoint's config.json flag: when true, a missing lm_head.weight
    means W_U is wte transposed; when false, lm_head.weight must be in the state dict.
    Raises WeightLoadError naming the key that is missing, unexpected, or of the wrong shape.
    """
    state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    if not tie_word_embeddings and "lm_head.weight" not in state:
        # Hugging Face would fill this unembedding with random numbers and a warning; wte would be a guess.
        raise WeightLoadError(
            "the checkpoint's config sets tie_word_embeddings=false but has no 'lm_head.weight', so its "
            "unembedding is not in the file; save the model again with its lm_head"
        )
    d, d_mlp = cfg.d_model, cfg.d_mlp
    expected = {"wte.weight": (cfg.d_vocab, d), "wpe.weight": (cfg.n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        expected |= {
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "mlp.c_fc.weight": (d, d_mlp), p + "mlp.c_fc.bias": (d_mlp,),
            p + "mlp.c_proj.weight": (d_mlp, d), p + "mlp.c_proj.bias": (d,),
        }  # fmt: skip
    optional = {"lm_head.weight": (cfg.d_vocab, d)}
    for key in state:
        if key not in expected and key not in optional and not _IGNORED_KEY.fullmatch(key):
            raise WeightLoadError(f"unexpected key {key!r} in checkpoint; it is not part of a GPT-2 with this config")
    for key, shape in (expected | optional).items():
        if key not in state:
            if key in optional:
                continue
            raise WeightLoadError(f"checkpoint is missing {key!r} (expected shape {shape})")
        if tuple(state[key].shape) != shape:
            raise WeightLoadError(f"{key!r} has shape {tuple(state[key].shape)}, expected {shape}")

    heads = {"n_heads": cfg.n_heads, "d_head": cfg.d_head}
    out = {
        "embed.W_E": state["wte.weight"],
        "pos_embed.W_pos": state["wpe.weight"],
        "ln_final.w": state["ln_f.weight"],
        "ln_final.b": state["ln_f.bias"],
        # A copy (never a view of wte, which would silently tie the two), kept vocab-major like Unembedding's own.
        "unembed.W_U": state.get("lm_head.weight", state["wte.weight"]).clone().T,
        "unembed.b_U": torch.zeros(cfg.d_vocab, dtype=state["wte.weight"].dtype),
    }
    for i in range(cfg.n_layers):
        p, o = f"h.{i}.", f"blocks.{i}."
        W_Q, W_K, W_V = state[p + "attn.c_attn.weight"].split(d, dim=1)
        b_Q, b_K, b_V = state[p + "attn.c_attn.bias"].split(d, dim=0)
        for name, W, b in (("Q", W_Q, b_Q), ("K", W_K, b_K), ("V", W_V, b_V)):
            # A dense copy of its own, d_model-major as solution.Attention stores it.
            W = einops.rearrange(W, "d_model (n_heads d_head) -> d_model n_heads d_head", **heads).contiguous()
            out[o + f"attn.W_{name}"] = einops.rearrange(W, "d_model n_heads d_head -> n_heads d_model d_head")
            out[o + f"attn.b_{name}"] = einops.rearrange(b, "(n_heads d_head) -> n_heads d_head", **heads)
        out[o + "attn.W_O"] = einops.rearrange(
            state[p + "attn.c_proj.weight"], "(n_heads d_head) d_model -> n_heads d_head d_model", **heads
        )
        out[o + "attn.b_O"] = state[p + "attn.c_proj.bias"]
        out[o + "ln1.w"], out[o + "ln1.b"] = state[p + "ln_1.weight"], state[p + "ln_1.bias"]
        out[o + "ln2.w"], out[o + "ln2.b"] = state[p + "ln_2.weight"], state[p + "ln_2.bias"]
        out[o + "mlp.W_in"], out[o + "mlp.b_in"] = state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]
        out[o + "mlp.W_out"], out[o + "mlp.b_out"] = state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"]
    # W_U and W_Q/W_K/W_V were made dense above in the layouts solution.py stores them in.
    laid_out = ("unembed.W_U", "attn.W_Q", "attn.W_K", "attn.W_V")
    return {k: v if k.endswith(laid_out) else v.contiguous() for k, v in out.items()}


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (config and weights only) and cached."""
    path = user_path(name_or_path, "name_or_path")
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ValueError(f"{path} is a file; pass the directory that holds config.json and {_WEIGHT_FILES[0]}")
    # Not asked of the hub: huggingface_hub refused "finetuned/" with its own repo-id rules, which
    # said nothing of a missing directory.
    if spelled_as_path(name):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    return _download_from_hub(HUB_ALIASES.get(name, name))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        logger.info("fetching %s from the Hugging Face Hub (or its local cache)", repo_id)
        # One format at a time, whole file or index first: a repository holding several would
        # otherwise be downloaded several times over. Older uploads have only the pickle.
        for weights in _WEIGHT_FILES:
            index = weights + _INDEX_SUFFIX
            directory = Path(snapshot_download(repo_id, allow_patterns=["config.json", weights, index]))
            if (directory / weights).is_file():
                return directory
            if (directory / index).is_file():
                shards = _shard_names(directory / index)
                return Path(snapshot_download(repo_id, allow_patterns=["config.json", index, *shards]))
        return directory
    except hub_errors() as e:
        # A near miss of a short name ("gpt2-mediumm", "gpt-2") is no repository the hub has either.
        close = difflib.get_close_matches(repo_id.lower(), HUB_ALIASES, n=1, cutoff=0.8)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OSError(
            f"{repo_id!r} is not a local directory, and the Hugging Face Hub "
            f"did not provide it ({hub_error_text(e)}).{hint} Offline? Pass a directory saved with "
            f"GPT2LMHeadModel.save_pretrained, or a checkpoint written by Transformer.save."
        ) from e


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed download from the Hugging Face Hub raises (for `except`): the model's here, a
    dataset's in gpt2_small.data."""
    import httpx

    # OSError covers huggingface_hub's own: HfHubHTTPError, LocalEntryNotFoundError (nothing cached,
    # offline) and OfflineModeIsEnabled all derive from it; httpx's transport errors do not.
    return (OSError, httpx.HTTPError)


def hub_error_text(error: BaseException) -> str:
    """ "Type: message" of a hub error, on one line: the hub's messages span lines ("404 Client
    Error.\n\nRepository Not Found for url: ..."), and the demos print our refusals as one line."""
    reason = " ".join(str(error).split())
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def read_hf_checkpoint(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json and the weights of a Hugging Face GPT-2 checkpoint directory."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        saved = (
            f"; {directory} holds a checkpoint written by Transformer.save: Transformer.load or "
            f"gpt2_small.load_model reads it"
            if (directory / CHECKPOINT_CONFIG).is_file()
            else ""
        )
        raise FileNotFoundError(
            f"{config_file} not found; a Hugging Face checkpoint directory needs config.json"
            f"{saved}{_training_run_hint(directory)}"
        )
    hf_config = _read_json(config_file)
    for weights, read in zip(_WEIGHT_FILES, (_read_safetensors, _read_pytorch_bin), strict=True):
        if (directory / weights).is_file():
            return hf_config, read(directory / weights)
        if (directory / (weights + _INDEX_SUFFIX)).is_file():
            return hf_config, _read_shards(directory / (weights + _INDEX_SUFFIX), read)
    raise FileNotFoundError(
        f"{directory} holds none of {', '.join(f'{w} or {w}{_INDEX_SUFFIX}' for w in _WEIGHT_FILES)}"
    )


def _read_pytorch_bin(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # What a cut-off or foreign file gives. Not UnpicklingError: torch's own message for a pickle
    # that weights_only refuses (it would run code) says more than ours could.
    except (RuntimeError, EOFError, KeyError) as e:
        raise ValueError(
            f"{path} is not a complete PyTorch checkpoint ({type(e).__name__}: {e}); it is damaged or cut "
            f"short: download or save it again"
        ) from e


def _shard_names(index_file: Path) -> list[str]:
    """The shard files a save_pretrained index lists, each a file beside the index."""
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_file} has no 'weight_map' object naming each tensor's shard file")
    names = sorted(set(weight_map.values()))
    # A name with a folder in it would read (or, from the hub, fetch) files outside the checkpoint.
    if outside := [name for name in names if Path(name).name != name or name in (".", "..")]:
        raise ValueError(f"{index_file} names shard files outside its directory: {outside}")
    return names


def _read_shards(index_file: Path, read: Callable[[Path], dict[str, Tensor]]) -> dict[str, Tensor]:
    names = _shard_names(index_file)
    if missing := [name for name in names if not (index_file.parent / name).is_file()]:
        raise FileNotFoundError(
            f"{index_file.parent} lacks {len(missing)} of the {len(names)} shard files {index_file.name} lists: "
            f"{missing}; download or save the checkpoint again"
        )
    state = {}
    for name in names:
        state.update(read(index_file.parent / name))
    return state


# Other libraries' loading options, and what to do here instead. TransformerLens's processing
# options rewrite the weights, which process_weights does here, after loading.
_PROCESSING_HINT = (
    "it loads the weights as they are (TransformerLens's from_pretrained_no_processing). TransformerLens's "
    "processing is a call of its own here, after loading: gpt2_small.process_weights(model, fold_ln=..., "
    "center_writing_weights=..., center_unembed=..., fold_value_biases=...), whose defaults are TransformerLens's"
)
OTHER_LOADING_OPTIONS = {
    **dict.fromkeys(("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"), _PROCESSING_HINT),
    "torch_dtype": "pass dtype=, a torch.dtype",  # Hugging Face's name for it before transformers 5
}


def load_hf_gpt2(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_class: type[Transformer] = Transformer,
) -> Transformer:
    """A Transformer holding the weights of a Hugging Face GPT-2 checkpoint (directory or hub id)."""
    _check_placement(device, dtype)
    directory = resolve_checkpoint_dir(name_or_path)
    hf_config, hf_state = read_hf_checkpoint(directory)
    cfg = config_from_hf(hf_config)
    state = convert_hf_state_dict(hf_state, cfg, tie_word_embeddings=hf_config.get("tie_word_embeddings", True))
    with torch.device("meta"):
        model = model_class(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **other_options: object,
) -> Transformer:
    """Any model this project reads, by what `name_or_path` holds:

    - a directory written by `Transformer.save` (gpt2_small_config.json + model.safetensors);
    - a training run's output directory (demos/train_demo.py --out-dir): its newest checkpoint;
    - a Hugging Face GPT-2 directory (config.json + weights), or a hub id such as "gpt2".

    The weights are loaded as they are; TransformerLens's fold_ln and the like are refused, naming
    process_weights, which applies them.
    """
    from gpt2_small.training import latest_checkpoint  # deferred: importing training here would be circular

    refuse_keywords("load_model", other_options, OTHER_LOADING_OPTIONS)
    path = user_path(name_or_path, "name_or_path")
    if (path / CHECKPOINT_CONFIG).is_file():
        return Transformer.load(path, device=device, dtype=dtype).eval()
    if _holds_training_run(path):
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path / 'checkpoints'} holds no complete checkpoint")
        return Transformer.load(newest, device=device, dtype=dtype).eval()
    return load_hf_gpt2(name_or_path, device=device, dtype=dtype)


def to_hf_state_dict(model: Transformer) -> tuple[dict[str, Tensor], bool]:
    """`model`'s weights under GPT2LMHeadModel's names and layouts (convert_hf_state_dict's inverse),
    and whether W_U is W_E transposed (then lm_head.weight is left out, and the checkpoint ties the
    two, as GPT-2's own does). unembed.b_U has no counterpart there and is not in the result.
    As with `state_dict()`, a tensor whose layout is the model's own shares the parameter's memory."""
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    tied = torch.equal(W_U.T, W_E)
    state = {
        "transformer.wte.weight": W_E,
        "transformer.wpe.weight": model.pos_embed.W_pos,
        "transformer.ln_f.weight": model.ln_final.w,
        "transformer.ln_f.bias": model.ln_final.b,
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        # HF's fused c_attn is x @ [W_Q | W_K | W_V], each part heads-major: stacked_qkv's layout.
        W_QKV, b_QKV = block.attn.stacked_qkv()
        state |= {
            p + "ln_1.weight": block.ln1.w, p + "ln_1.bias": block.ln1.b,
            p + "attn.c_attn.weight": W_QKV, p + "attn.c_attn.bias": b_QKV,
            p + "attn.c_proj.weight": einops.rearrange(
                block.attn.W_O, "n_heads d_head d_model -> (n_heads d_head) d_model"
            ),
            p + "attn.c_proj.bias": block.attn.b_O,
            p + "ln_2.weight": block.ln2.w, p + "ln_2.bias": block.ln2.b,
            p + "mlp.c_fc.weight": block.mlp.W_in, p + "mlp.c_fc.bias": block.mlp.b_in,
            p + "mlp.c_proj.weight": block.mlp.W_out, p + "mlp.c_proj.bias": block.mlp.b_out,
        }  # fmt: skip
    if not tied:
        state["lm_head.weight"] = W_U.T
    return _dense_unshared(state), tied


def export_hf(
    model: Transformer,
    directory: str | os.PathLike,
    *,
    tokenizer: bool = True,
    drop_unembed_bias: bool = False,
) -> Path:
    """Write `model` to `directory` in Hugging Face's GPT-2 format: config.json and
    model.safetensors as GPT2LMHeadModel.save_pretrained writes them (and, with `tokenizer`, the
    GPT-2 tokenizer beside them, which TransformerBridge.boot_transformers needs). The directory
    is created if needed; each file is written under a temporary name and renamed into place.

    GPT2LMHeadModel(directory), load_model(directory) and the bridge then compute this model's
    logits (tested to float32 rounding), with one exception: GPT-2 has no unembedding bias. A
    model trained here with the tiny preset (or --unembed-bias) learns b_U, so a non-zero b_U is
    refused unless `drop_unembed_bias`, which exports the model without it: every position's
    logits then lose b_U, and so its next-token probabilities change (unless b_U is the same for
    every token).
    """
    from safetensors.torch import save_file

    check_model(model)
    check_flag("tokenizer", tokenizer)
    check_flag("drop_unembed_bias", drop_unembed_bias)
    path = directory_to_write(directory, "directory", "export_hf")
    for marker in (CHECKPOINT_CONFIG, "checkpoints"):
        if (path / marker).exists():
            raise ValueError(
                f"{path} holds a gpt2_small checkpoint or training run ({marker}); export to a directory of its own, "
                f"as load_model would read that instead"
            )
    b_U = model.unembed.b_U.detach()
    if not drop_unembed_bias and bool(b_U.any()):
        raise ValueError(
            f"unembed.b_U is not zero (largest |b_U| {float(b_U.abs().max()):.3g}): GPT-2 has no unembedding bias, "
            f"so the exported model's logits would lack it. gpt2_small's trainer learns b_U unless told not to "
            f"(--no-unembed-bias, the gpt2 preset's default); pass drop_unembed_bias=True to export it anyway, "
            f"without b_U"
        )
    from transformers import GPT2Config  # deferred: transformers is slow to import

    state, tied = to_hf_state_dict(model)
    cfg = model.cfg
    eos = EOT_ID if EOT_ID < cfg.d_vocab else None
    config = GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_range, activation_function="gelu_new", tie_word_embeddings=tied,
        # No dropout: this model has none, so a Hugging Face training run continues the same function.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # <|endoftext|> as GPT-2's; a model whose vocabulary stops short of it has none.
        bos_token_id=eos, eos_token_id=eos, architectures=["GPT2LMHeadModel"],
        dtype=str(model.dtype).removeprefix("torch."),
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / _WEIGHT_FILES[0], lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(config.to_json_string()))
    if tokenizer:
        hf_tokenizer().save_pretrained(path)
    logger.info("exported to %s in Hugging Face's GPT-2 format (%s embeddings)", path, "tied" if tied else "untied")
    return path
