"""Loading Hugging Face GPT-2 checkpoints, and our own save/load round trip."""

import copy
import inspect
import json
import re
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2_small
from gpt2_small import (
    Transformer,
    TransformerConfig,
    WeightLoadError,
    config_from_hf,
    convert_hf_state_dict,
    load_model,
    process_weights,
)

# Small enough that the tests of checkpoint files, loading and export take milliseconds.
NANO = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=8)


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def tokens_for(cfg, batch=2, pos=11):
    return torch.randint(0, cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(3))


def copy_with_state(src, dst, edit):
    """Copy an HF checkpoint directory, editing its safetensors state dict on the way."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_from_pretrained_matches_hf_logits(tiny_checkpoint):
    directory, hf = tiny_checkpoint
    model = Transformer.from_pretrained(directory)
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))
    assert not model.training


def test_W_U_is_an_untied_vocab_major_copy(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    model = Transformer.from_pretrained(directory)
    W_U, W_E = model.unembed.W_U, model.embed.W_E
    assert W_U.shape == (32, 50257) and W_U.stride() == (1, 32)  # stored [d_vocab d_model], like lm_head
    assert W_U.untyped_storage().data_ptr() != W_E.untyped_storage().data_ptr()
    with torch.no_grad():
        W_E[0, 0] += 1.0
    assert W_U[0, 0] != W_E[0, 0]  # editing one leaves the other alone
    assert model.to(torch.bfloat16).unembed.W_U.stride() == (1, 32)
    model.save(tmp_path / "ckpt")
    assert Transformer.load(tmp_path / "ckpt").unembed.W_U.stride() == (1, 32)


def test_W_Q_W_K_W_V_are_dense_and_d_model_major_however_the_model_was_made(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    d_model_major = (8, 32, 1)  # [n_heads=4 d_model=32 d_head=8], d_model outermost in memory
    loaded = Transformer.from_pretrained(directory)
    made = Transformer(loaded.cfg)
    loaded.save(tmp_path / "ckpt")
    # A copy to convert: Module.to converts in place, and would remake `loaded`'s own tensors first.
    for model in (made, loaded, copy.deepcopy(loaded).to(torch.bfloat16), Transformer.load(tmp_path / "ckpt")):
        attn = model.blocks[0].attn
        storages = {W.untyped_storage().data_ptr() for W in (attn.W_Q, attn.W_K, attn.W_V)}
        assert len(storages) == 3  # not views into HF's fused c_attn weight
        for W in (attn.W_Q, attn.W_K, attn.W_V):
            assert W.shape == (4, 32, 8) and W.stride() == d_model_major


def test_from_pretrained_reads_the_shape_from_config_json(tiny_checkpoint):
    directory, hf = tiny_checkpoint
    cfg = Transformer.from_pretrained(str(directory)).cfg  # str and Path both accepted
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx) == (2, 32, 4, 8, 64, 24)


def test_a_checkpoint_stored_in_bfloat16_loads_in_bfloat16_throughout(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    copy_with_state(directory, tmp_path / "ckpt", lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    model = Transformer.from_pretrained(tmp_path / "ckpt")
    assert {name: p.dtype for name, p in model.named_parameters()} == dict.fromkeys(
        model.state_dict(), torch.bfloat16
    )  # b_U too, which the checkpoint does not hold


def test_a_gelu_pytorch_tanh_checkpoint_loads_as_the_same_model(tiny_checkpoint, tmp_path):
    """transformers computes gelu_pytorch_tanh with torch's tanh GELU, gelu_new's formula."""
    directory, _ = tiny_checkpoint
    shutil.copytree(directory, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text()) | {"activation_function": "gelu_pytorch_tanh"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    assert theirs.config.activation_function == "gelu_pytorch_tanh"
    ours = Transformer.from_pretrained(tmp_path / "ckpt")
    tokens = tokens_for(ours.cfg)
    torch.testing.assert_close(ours(tokens), hf_logits(theirs, tokens))


def test_from_pretrained_reads_pytorch_model_bin(tiny_checkpoint, tmp_path):
    directory, hf = tiny_checkpoint
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = Transformer.from_pretrained(tmp_path)
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))


def test_pytorch_model_bin_is_never_unpickled_with_code(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    shutil.copy(directory / "config.json", tmp_path / "config.json")

    class Payload:
        def __reduce__(self):
            return (print, ("this ran during loading",))

    torch.save({"wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        Transformer.from_pretrained(tmp_path)


def test_from_pretrained_device_and_dtype(tiny_checkpoint):
    directory, hf = tiny_checkpoint
    model = Transformer.from_pretrained(directory, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu")
    tokens = tokens_for(model.cfg)
    expected = hf_logits(hf, tokens)
    rel = (model(tokens).float() - expected).norm() / expected.norm()
    assert rel < 4 * torch.finfo(torch.bfloat16).eps, rel  # a few bf16 roundings, not a wrong model


def test_old_causal_mask_buffers_in_a_checkpoint_are_ignored(tiny_checkpoint, tmp_path):
    directory, hf = tiny_checkpoint

    def add_buffers(state):
        state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
        state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)

    model = Transformer.from_pretrained(copy_with_state(directory, tmp_path / "ckpt", add_buffers))
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))


def test_an_untied_lm_head_becomes_W_U(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    lm_head = torch.randn(50257, 32)
    model = Transformer.from_pretrained(
        copy_with_state(directory, tmp_path / "ckpt", lambda s: s.__setitem__("lm_head.weight", lm_head))
    )
    assert torch.equal(model.unembed.W_U, lm_head.T)
    assert not torch.equal(model.unembed.W_U, model.embed.W_E.T)


def test_an_untied_checkpoint_loads_its_lm_head_and_one_without_it_is_refused(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=4,
        n_positions=16,
        vocab_size=100,
        bos_token_id=99,
        eos_token_id=99,
        tie_word_embeddings=False,
    )
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "untied")
    model = Transformer.from_pretrained(tmp_path / "untied")
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))
    assert not torch.equal(model.unembed.W_U, model.embed.W_E.T)
    # Hugging Face would fill the missing unembedding with random numbers; W_E would be a guess just as silent.
    with pytest.raises(WeightLoadError, match=r"tie_word_embeddings=false but has no 'lm_head.weight'"):
        Transformer.from_pretrained(
            copy_with_state(tmp_path / "untied", tmp_path / "cut", lambda s: s.pop("lm_head.weight"))
        )


def test_a_config_json_without_tie_word_embeddings_ties_as_gpt2_does(tiny_checkpoint, tmp_path):
    """GPT2Config's default is tied: a config.json that leaves the flag out (hand-written, or
    written by a tool that drops defaults) loads without lm_head.weight, W_U = W_E^T."""
    shutil.copytree(tiny_checkpoint[0], tmp_path, dirs_exist_ok=True)
    _edit_json(tmp_path / "config.json", drop="tie_word_embeddings")
    assert "tie_word_embeddings" not in json.loads((tmp_path / "config.json").read_text())
    model = Transformer.from_pretrained(tmp_path)
    assert torch.equal(model.unembed.W_U, tiny_checkpoint[1].transformer.wte.weight.T)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), r"missing 'h.1.mlp.c_fc.bias' \(expected shape \(64,\)\)"),
        (lambda s: s.__setitem__("transformer.h.0.attn.rotary", torch.zeros(3)), r"unexpected key 'h.0.attn.rotary'"),
        # Named like the old mask buffers, which are ignored, but not one of them.
        (lambda s: s.__setitem__("transformer.h.0.attn.bias_k", torch.zeros(32)), r"unexpected key 'h.0.attn.bias_k'"),
        (
            lambda s: s.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(32, 95)),
            r"'h.0.attn.c_attn.weight' has shape \(32, 95\), expected \(32, 96\)",
        ),
        (lambda s: s.__setitem__("lm_head.weight", torch.zeros(5, 32)), r"'lm_head.weight' has shape \(5, 32\)"),
    ],
    ids=["missing", "unexpected", "unexpected-bias-like", "wrong-shape", "wrong-lm-head"],
)
def test_bad_checkpoints_name_the_key(tiny_checkpoint, tmp_path, edit, message):
    directory, _ = tiny_checkpoint
    with pytest.raises(WeightLoadError, match=message):
        Transformer.from_pretrained(copy_with_state(directory, tmp_path / "ckpt", edit))


def test_convert_rejects_a_state_dict_for_another_shape(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    state = load_file(directory / "model.safetensors")
    cfg = TransformerConfig(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, n_ctx=24)
    with pytest.raises(WeightLoadError, match="missing 'h.2.ln_1.weight'"):
        convert_hf_state_dict(state, cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"model_type": "llama"}, "model_type 'gpt2'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
        (
            {"scale_attn_weights": False},
            "scale_attn_weights=False is not supported; GPT-2 uses scale_attn_weights=True",
        ),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported"),
        # before, the first cross-attention tensor was named as an unexpected key, after the weights were read
        (
            {"add_cross_attention": True},
            "add_cross_attention=True is not supported; GPT-2 uses add_cross_attention=False",
        ),
        ({"n_head": 5}, "n_embd=32 is not divisible by n_head=5"),
    ],
)
def test_unsupported_hf_configs_are_refused(tiny_checkpoint, change, message):
    directory, _ = tiny_checkpoint
    hf_config = json.loads((directory / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf_config)


def test_a_minimal_or_old_config_json_takes_gpt2s_defaults():
    """A hand-written config.json or an old upload's (n_ctx, not n_positions): GPT2Config's defaults
    fill the rest, as Hugging Face's from_pretrained would."""
    minimal = {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100}
    cfg = config_from_hf(minimal)
    assert (cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers, cfg.d_vocab) == (64, 4, 16, 2, 100)
    assert (cfg.d_mlp, cfg.n_ctx, cfg.layer_norm_eps, cfg.init_range) == (256, 1024, 1e-5, 0.02)
    assert config_from_hf(minimal | {"n_ctx": 64}).n_ctx == 64
    assert config_from_hf(minimal | {"n_ctx": 64, "n_positions": 128}).n_ctx == 128
    for key in minimal:
        with pytest.raises(ValueError, match=f"^the GPT-2 config.json lacks {key}; every GPT2Config writes them$"):
            config_from_hf({k: v for k, v in minimal.items() if k != key})


def test_a_config_json_whose_sizes_are_no_ints_is_named(without_shape_checks):
    """Before: a quoted "64" made n_embd % n_head a str formatting, failing with "not all arguments
    converted during string formatting"; a list for the whole config, with "'list' object has no
    attribute 'get'"."""
    minimal = {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100}
    for key, value in [("n_embd", "64"), ("n_head", 4.0), ("n_layer", True), ("n_positions", "1024"), ("n_inner", 2.5)]:
        with pytest.raises(
            ValueError, match=rf"^the GPT-2 config.json's {key} must be an int, got {re.escape(repr(value))}$"
        ):
            config_from_hf(minimal | {key: value})
    assert config_from_hf(minimal | {"n_inner": None}).d_mlp == 256  # GPT2Config writes null: 4 * n_embd
    with pytest.raises(TypeError, match=r"^hf_config must be the dict of a config.json, got list$"):
        config_from_hf([minimal])


def test_missing_directory_and_files(tmp_path, monkeypatch, offline_hub):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        Transformer.from_pretrained(tmp_path / "nope" / "deeper")
    # Spelled as paths, not hub ids ("user/model"), so never looked up on the hub, which offline
    # with an empty cache would raise a plain OSError.
    monkeypatch.chdir(tmp_path)
    for name in ("./finetuned", "/finetuned-gpt2", "~/no-such-gpt2-checkpoint", "runs/finetuned/final", "finetuned/"):
        with pytest.raises(
            FileNotFoundError, match=f"no checkpoint directory at {re.escape(str(Path(name).expanduser()))}$"
        ):
            Transformer.from_pretrained(name)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.safetensors is a file; pass the directory that holds config.json"):
        Transformer.from_pretrained(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_from_pretrained_on_a_transformer_save_directory_names_the_loader_that_reads_it(tmp_path):
    """As Transformer.load on a Hugging Face directory names from_pretrained; before, only config.json was named."""
    Transformer(TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8)).save(tmp_path / "m")
    with pytest.raises(FileNotFoundError) as error:
        Transformer.from_pretrained(tmp_path / "m")
    assert str(error.value) == (
        f"{tmp_path / 'm' / 'config.json'} not found; a Hugging Face checkpoint directory needs config.json; "
        f"{tmp_path / 'm'} holds a checkpoint written by Transformer.save: Transformer.load or gpt2_small.load_model "
        "reads it"
    )
    assert isinstance(load_model(tmp_path / "m"), Transformer)  # as it says


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text("{cut off"), r"config.json is not valid JSON \(Expecting"),
        (lambda d: (d / "config.json").write_text('["n_embd", 32]'), r"config.json holds a JSON list, not an object"),
        (lambda d: (d / "model.safetensors").write_bytes(b""), r"model.safetensors is not a complete safetensors file"),
        (lambda d: _truncate(d / "model.safetensors"), r"model.safetensors is not a complete safetensors file"),
        (
            lambda d: _edit_json(d / "config.json", drop="n_embd"),
            r"the GPT-2 config.json lacks n_embd; every GPT2Config",
        ),
    ],
    ids=["config-json", "config-list", "empty-weights", "cut-weights", "config-key"],
)
def test_a_damaged_hf_checkpoint_is_named_in_a_value_error(tiny_checkpoint, tmp_path, damage, message):
    """Before: json's JSONDecodeError or a KeyError naming no file, or safetensors' SafetensorError,
    which is no ValueError, so the demos showed a traceback."""
    shutil.copytree(tiny_checkpoint[0], tmp_path, dirs_exist_ok=True)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(tmp_path)


def test_a_cut_off_pytorch_model_bin_is_named_in_a_value_error(tiny_checkpoint, tmp_path):
    directory, hf = tiny_checkpoint
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    _truncate(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a complete PyTorch checkpoint \(RuntimeError"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a complete PyTorch checkpoint \(EOFError"):
        Transformer.from_pretrained(tmp_path)


def _shard_pytorch_bin(state: dict, directory: Path) -> None:
    """Two pickled shards and their index, as save_pretrained(safe_serialization=False) wrote them
    in transformers 4 (5 writes safetensors only)."""
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map |= dict.fromkeys(part, name)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_sharded_checkpoint_loads_from_its_index(tiny_checkpoint, tmp_path, kind):
    """save_pretrained shards a model larger than max_shard_size (transformers 4: from 5 GB, so
    gpt2-xl in float32). Before: "holds none of ('model.safetensors', 'pytorch_model.bin')"."""
    directory, hf = tiny_checkpoint
    if kind == "safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="2MB")
    else:
        shutil.copy(directory / "config.json", tmp_path)
        _shard_pytorch_bin(hf.state_dict(), tmp_path)
    shards = sorted(p.name for p in tmp_path.glob(f"*-of-*.{kind}"))
    assert len(shards) > 1 and not (tmp_path / f"model.{kind}").exists()
    model = Transformer.from_pretrained(tmp_path)
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))
    # Every shard is read: without the last, the load fails naming it.
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"lacks 1 of the {len(shards)} shard files .*\['{shards[-1]}'\]"):
        Transformer.from_pretrained(tmp_path)


def test_a_whole_weights_file_is_read_before_an_index_beside_it(tiny_checkpoint, tmp_path):
    """Hugging Face's order: model.safetensors, its index, then the pickle's. An index whose shards
    are gone is then never opened."""
    directory, hf = tiny_checkpoint
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "gone.safetensors"}})
    )
    model = Transformer.from_pretrained(tmp_path)
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of the 1 shard files model.safetensors.index.json lists"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (["model-00001-of-00002.safetensors"], r"holds a JSON list, not an object"),
        ({"metadata": {}}, r"has no 'weight_map' object naming each tensor's shard file"),
        ({"weight_map": {}}, r"has no 'weight_map' object"),
        ({"weight_map": {"wte.weight": 3}}, r"has no 'weight_map' object"),
        (
            {"weight_map": {"wte.weight": "../model.safetensors"}},
            r"names shard files outside its directory: \['../model.safetensors'\]",
        ),
        (
            {"weight_map": {"wte.weight": "/etc/model.safetensors"}},
            r"names shard files outside its directory: \['/etc/model.safetensors'\]",
        ),
    ],
    ids=["a-list", "no-map", "empty-map", "not-a-name", "parent", "absolute"],
)
def test_an_index_that_names_no_shard_beside_it_is_refused(tiny_checkpoint, tmp_path, index, message):
    # Whole weights one folder up, which a followed "../model.safetensors" would load.
    shutil.copy(tiny_checkpoint[0] / "model.safetensors", tmp_path)
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    shutil.copy(tiny_checkpoint[0] / "config.json", directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json " + message):
        Transformer.from_pretrained(directory)


def test_a_damaged_gpt2_small_checkpoint_is_named_in_a_value_error(tmp_path):
    cfg = NANO
    Transformer(cfg).save(tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is not a complete safetensors file"):
        Transformer.load(tmp_path)
    for damaged in (b'{"format": "gpt2_sm', b'{"format": "\xff"}'):  # cut short; not UTF-8
        (tmp_path / "gpt2_small_config.json").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"gpt2_small_config.json is not valid JSON"):
            Transformer.load(tmp_path)
    (tmp_path / "gpt2_small_config.json").write_text('"gpt2_small"')
    with pytest.raises(
        ValueError, match=r"gpt2_small_config.json holds a JSON str, not an object; the file is damaged"
    ):
        Transformer.load(tmp_path)


def test_a_gpt2_small_config_with_unknown_fields_is_refused_by_name(tmp_path):
    """Before: TypeError "unexpected keyword argument 'rotary'", naming no file."""
    cfg = NANO
    Transformer(cfg).save(tmp_path)
    config_file = tmp_path / "gpt2_small_config.json"
    meta = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(meta | {"config": meta["config"] | {"rotary": True}}))
    with pytest.raises(ValueError, match=r"gpt2_small_config.json sets \['rotary'\], which TransformerConfig does not"):
        Transformer.load(tmp_path)
    for config in (None, ["d_model", 16]):  # absent, or not an object
        config_file.write_text(json.dumps({"format": "gpt2_small"} | ({} if config is None else {"config": config})))
        with pytest.raises(ValueError, match=r"gpt2_small_config.json has no 'config' object"):
            Transformer.load(tmp_path)
    # A field the file lacks (a checkpoint older than the field) takes its default.
    config_file.write_text(json.dumps(meta | {"config": {k: v for k, v in meta["config"].items() if k != "attn_impl"}}))
    assert Transformer.load(tmp_path).cfg == cfg


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, drop: str) -> None:
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != drop}))


def test_a_path_that_is_no_str_or_path_is_named(without_shape_checks):
    """Before: os.fspath's "expected str, bytes or os.PathLike object, not NoneType", naming no argument."""
    from gpt2_small.training import latest_checkpoint

    model = Transformer(NANO)
    for call, name in [
        (lambda: gpt2_small.load_model(None), "name_or_path"),
        (lambda: Transformer.from_pretrained(3), "name_or_path"),
        (lambda: model.save(None), "path"),
        (lambda: Transformer.load(None), "path"),
        (lambda: gpt2_small.export_hf(model, None), "directory"),
        (lambda: latest_checkpoint(None), "out_dir"),
    ]:
        with pytest.raises(TypeError, match=rf"^{name} must be a str or os.PathLike path, got (NoneType|int)$"):
            call()


def test_hub_id_offline_gives_one_clear_error(offline_hub):
    with pytest.raises(OSError, match=r"^'openai-community/gpt2' is not a local directory, .*Offline\?") as error:
        Transformer.from_pretrained("gpt2")
    assert "\n" not in str(error.value)  # the hub's own message spans lines; the demos print this one


def test_the_hub_s_message_over_several_lines_is_folded_to_one(monkeypatch):
    """As huggingface_hub words a repository it lacks (RepositoryNotFoundError is an OSError)."""

    def snapshot_download(repo_id, allow_patterns):
        raise OSError("404 Client Error. (Request ID: x)\n\nRepository Not Found for url: https://huggingface.co/u/m.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(OSError) as error:
        Transformer.from_pretrained("u/m")
    assert str(error.value).startswith(
        "'u/m' is not a local directory, and the Hugging Face Hub did not provide it (OSError: 404 Client Error. "
        "(Request ID: x) Repository Not Found for url: https://huggingface.co/u/m.). Offline?"
    )


@pytest.mark.parametrize("option", ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"])
def test_transformerlens_s_processing_options_are_refused_naming_process_weights(tiny_checkpoint, option):
    directory, _ = tiny_checkpoint
    for caller, load in (("Transformer.from_pretrained", Transformer.from_pretrained), ("load_model", load_model)):
        with pytest.raises(TypeError, match=rf"^{caller} takes no {option}: .*gpt2_small\.process_weights\(model, "):
            load(directory, **{option: True})
    # every option named is one of process_weights' own
    assert option in inspect.signature(process_weights).parameters


def test_hugging_face_s_torch_dtype_is_refused_naming_dtype_and_other_keywords_as_python_does(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    for caller, load in (("Transformer.from_pretrained", Transformer.from_pretrained), ("load_model", load_model)):
        with pytest.raises(TypeError, match=rf"^{caller} takes no torch_dtype: pass dtype=, a torch.dtype$"):
            load(directory, torch_dtype=torch.float16)
        with pytest.raises(TypeError, match=rf"^{caller}\(\) got an unexpected keyword argument 'devise'$"):
            load(directory, devise="cpu")


def test_gpt2_small_is_transformerlens_s_name_for_gpt2(offline_hub):
    with pytest.raises(OSError, match=r"^'openai-community/gpt2' is not a local directory"):
        Transformer.from_pretrained("gpt2-small")


@pytest.mark.parametrize(
    "name, meant",
    [
        ("gpt2-mediumm", "gpt2-medium"),
        ("gpt-2", "gpt2"),
        ("GPT2", "gpt2"),
        ("gpt2_medium", "gpt2-medium"),
        ("x/y", None),
    ],
)
def test_a_hub_id_the_hub_lacks_that_is_near_a_short_name_suggests_it(offline_hub, name, meant):
    with pytest.raises(OSError, match=rf"^'{name}' is not a local directory") as error:
        Transformer.from_pretrained(name)
    assert ("Did you mean" in str(error.value)) == (meant is not None)
    if meant:
        assert f"). Did you mean '{meant}'? Offline?" in str(error.value)


def test_what_the_hub_raises_online_is_the_same_clear_error(monkeypatch):
    """httpx's transport errors (a dropped connection, a timeout) are no OSError; the hub's own are."""
    import httpx

    for error in (httpx.ConnectError("connection reset"), httpx.ReadTimeout("timed out"), ConnectionError("down")):

        def snapshot_download(repo_id, allow_patterns, error=error):
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        named = rf"^'openai-community/gpt2' is not a local directory, .*\({type(error).__name__}: "
        with pytest.raises(OSError, match=named):
            Transformer.from_pretrained("gpt2")


@pytest.mark.parametrize("layout", ["safetensors", "bin-only", "sharded"])
def test_a_hub_id_downloads_the_config_and_one_weights_file(
    tiny_checkpoint, tmp_path, monkeypatch, layout, offline_hub
):
    """The hub stands in for a repository holding both files; like older uploads, only the pickle;
    or, like an upload of a large model, the pickle and safetensors shards with their index."""
    directory, hf = tiny_checkpoint
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(directory / "config.json", repo)
    torch.save(hf.state_dict(), repo / "pytorch_model.bin")
    if layout == "safetensors":
        shutil.copy(directory / "model.safetensors", repo)
    elif layout == "sharded":
        hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
        for path in (tmp_path / "sharded").glob("model*"):
            shutil.copy(path, repo)
    shards = sorted(p.name for p in repo.glob("model-*-of-*.safetensors"))
    assert (len(shards) > 1) == (layout == "sharded")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        snapshot = tmp_path / f"snapshot-{len(calls)}"
        snapshot.mkdir()
        for name in allow_patterns:
            if (repo / name).is_file():
                shutil.copy(repo / name, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    # Were the stand-in not called, offline with an empty cache the real hub would raise, not download.
    model = Transformer.from_pretrained("gpt2")
    tokens = tokens_for(model.cfg)
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens))
    repo_id, index = "openai-community/gpt2", "model.safetensors.index.json"
    first = (repo_id, ["config.json", "model.safetensors", index])
    # Only the files one format needs: the pickle is never fetched beside safetensors.
    assert (
        calls
        == {
            "safetensors": [first],
            "bin-only": [first, (repo_id, ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json"])],
            "sharded": [first, (repo_id, ["config.json", index, *shards])],
        }[layout]
    )


@pytest.mark.parametrize(
    ("placement", "error", "message"),
    [
        (dict(device="foo"), ValueError, r"device 'foo' is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        (dict(device=0), TypeError, r"device must be a str or torch.device, got int"),
        (dict(dtype=torch.int8), ValueError, r"dtype must be floating point \(torch.float32, bfloat16 or float16\), got torch.int8"),
        (dict(dtype="bfloat16"), TypeError, r"dtype must be a torch.dtype such as torch.bfloat16, got 'bfloat16'"),
    ],
)  # fmt: skip
def test_a_bad_device_or_dtype_is_refused_before_any_weights_are_read(
    tmp_path, placement, error, message, without_shape_checks, offline_hub
):
    # Shape checks off, as in a user's code: beartype would refuse a mistyped device or dtype first.
    # Offline with an empty cache, a hub id raises OSError once it is looked up: the ValueError
    # shows the check came first (online, before a download of up to 6 GB).
    with pytest.raises(error, match=message):
        Transformer.from_pretrained("gpt2", **placement)
    with pytest.raises(error, match=message):
        Transformer.load(tmp_path / "no checkpoint here", **placement)


# --- our own checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("as_str", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, as_str):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        d_model=48, n_layers=2, n_heads=3, d_head=16, d_mlp=100, d_vocab=97, n_ctx=20, attn_impl="eager"
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = tmp_path / "ckpt"
    model.save(str(path) if as_str else path)
    loaded = Transformer.load(str(path) if as_str else path)
    assert loaded.cfg == cfg
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    tokens = torch.randint(0, 97, (2, 20))
    assert torch.equal(model(tokens), loaded(tokens))
    assert sorted(p.name for p in path.iterdir()) == ["gpt2_small_config.json", "model.safetensors"]
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # as save_pretrained writes it, which HF's loaders check


def test_save_and_load_expand_a_directory_under_home(home):
    model = Transformer(NANO)
    assert model.save("~/ckpt") == home / "ckpt"
    assert (home / "ckpt" / "model.safetensors").is_file() and not Path("~").exists()
    loaded = Transformer.load("~/ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters(), strict=True))


def test_an_empty_path_is_refused_not_taken_for_the_working_directory(tmp_path, monkeypatch):
    """Before: Path("") is ".", so save("") wrote a checkpoint into the working directory, and
    load(""), load_model("") read one from there (an unset variable passed as the path)."""
    monkeypatch.chdir(tmp_path)
    model = Transformer(NANO)
    model.save(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")  # a checkpoint that "" would have found
    for call, name in [
        (lambda: model.save(""), "path"),
        (lambda: Transformer.load(""), "path"),
        (lambda: load_model(""), "name_or_path"),
        (lambda: Transformer.from_pretrained(""), "name_or_path"),
        (lambda: gpt2_small.export_hf(model, ""), "directory"),
    ]:
        with pytest.raises(
            ValueError, match=rf"^{name} is an empty path; name one \('\.' for the working directory\)$"
        ):
            call()
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == ["gpt2_small_config.json", "model.safetensors"]
    assert Transformer.load(".").cfg == NANO  # "." says it


def test_save_refuses_a_file_a_hugging_face_checkpoint_and_a_training_run(tmp_path, tiny_checkpoint):
    """Before: FileExistsError for a file; into a Hugging Face directory it overwrote that checkpoint's
    model.safetensors with its own (same name, other tensor names); into a training run its files
    shadowed the run's checkpoints, which load_model and generate_demo read after them."""
    model = Transformer(NANO)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file is a file; Transformer.save writes a directory"):
        model.save(tmp_path / "file")
    with pytest.raises(ValueError) as under:  # before: NotADirectoryError, errno 20, naming no file
        model.save(tmp_path / "file" / "model")
    assert str(under.value) == f"{tmp_path / 'file' / 'model'} lies under {tmp_path / 'file'}, which is a file; " + (
        "Transformer.save writes a directory"
    )
    hf_dir = shutil.copytree(tiny_checkpoint[0], tmp_path / "hf")  # a copy: the fixture is shared
    weights = (hf_dir / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds a Hugging Face checkpoint \(config.json\), whose model.safetensors"):
        model.save(hf_dir)
    assert (hf_dir / "model.safetensors").read_bytes() == weights and not (hf_dir / "gpt2_small_config.json").exists()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"run holds a training run \(checkpoints/\); save to a directory of its own"):
        model.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    model.save(tmp_path / "ckpt")
    model.save(tmp_path / "ckpt")  # its own earlier checkpoint it overwrites
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["gpt2_small_config.json", "model.safetensors"]


def test_save_load_keeps_bfloat16(tmp_path):
    model = Transformer(NANO)
    model.to(torch.bfloat16).save(tmp_path)
    loaded = Transformer.load(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters(), strict=True))


@pytest.mark.parametrize("name", ["model.safetensors", "gpt2_small_config.json"])
def test_a_save_cut_off_while_writing_a_file_leaves_the_earlier_file_whole(tmp_path, monkeypatch, name):
    """Each file is written under a temporary name and renamed into place once complete: a crash
    halfway through writing either one leaves the earlier checkpoint's file as it was, loadable,
    and no temporary file behind (written in place, the half would have replaced it)."""
    cfg = NANO
    torch.manual_seed(0)
    Transformer(cfg).save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if name == "model.safetensors":
        real_save_file = safetensors.torch.save_file

        def cut_off(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", cut_off)
    else:
        real_write_text = Path.write_text

        def cut_off(self, text, *args, **kwargs):
            if name not in self.name:
                return real_write_text(self, text, *args, **kwargs)
            real_write_text(self, text[: len(text) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(Path, "write_text", cut_off)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        Transformer(cfg).save(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    assert (tmp_path / name).read_bytes() == before[name]
    assert Transformer.load(tmp_path).cfg == cfg


def test_load_refuses_what_save_did_not_write(tmp_path, tiny_checkpoint):
    # No checkpoints/ folder here, so no hint about a training run's directory.
    with pytest.raises(
        FileNotFoundError, match=r"expects a directory written by Transformer.save .*from_pretrained\)$"
    ):
        Transformer.load(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a training run's output directory: the hint says what to call
    with pytest.raises(FileNotFoundError, match=re.escape(f"; {run} holds a training run: gpt2_small.load_model(")):
        Transformer.load(run)
    (tmp_path / "gpt2_small_config.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a gpt2_small checkpoint config"):
        Transformer.load(tmp_path)
    cfg = NANO
    Transformer(cfg).save(tmp_path)
    _edit_json(tmp_path / "gpt2_small_config.json", drop="format")  # a valid config with no format tag
    with pytest.raises(ValueError, match=r"not a gpt2_small checkpoint config \(format=None\)"):
        Transformer.load(tmp_path)
    Transformer(cfg).save(tmp_path)
    save_file({}, tmp_path / "model.safetensors")  # a valid safetensors file with nothing in it
    with pytest.raises(ValueError, match="model.safetensors holds no tensors"):
        Transformer.load(tmp_path)


def test_load_names_tensors_that_do_not_match_the_config(tmp_path):
    """Loaded leniently, a checkpoint missing a tensor would keep that parameter's random init."""
    cfg = NANO
    Transformer(cfg).save(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["blocks.0.attn.b_Q"]
    state["blocks.0.mlp.b_in"] = torch.zeros(5)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        WeightLoadError, match="model.safetensors does not hold the tensors gpt2_small_config.json"
    ) as e:
        Transformer.load(tmp_path)
    assert '"blocks.0.attn.b_Q"' in str(e.value) and "blocks.0.mlp.b_in" in str(e.value)


def test_load_converts_to_the_dtype_asked_for(tmp_path):
    model = Transformer(NANO)
    model.save(tmp_path)
    loaded = Transformer.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(
        torch.equal(a.to(torch.bfloat16), b) for a, b in zip(model.parameters(), loaded.parameters(), strict=True)
    )
    assert {p.dtype for p in gpt2_small.load_model(tmp_path, dtype=torch.float16).parameters()} == {torch.float16}


# --- export to Hugging Face's format -----------------------------------------------------------


def _trained_looking_model(seed: int = 0) -> Transformer:
    """Odd shapes and settings (d_head 12, d_mlp 100, eps 1e-3, init_range 0.05) and every
    parameter but b_U off its init, as after training: a swapped or dropped bias or LayerNorm
    parameter changes the logits, and a dropped setting changes the config read back."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=48, n_layers=2, n_heads=4, d_head=12, d_mlp=100, d_vocab=50257, n_ctx=24, layer_norm_eps=1e-3,
        init_range=0.05,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "unembed.b_U":
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_export_hf_gives_hf_and_the_bridge_this_models_logits(tmp_path):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    model = _trained_looking_model()
    directory = gpt2_small.export_hf(model, tmp_path / "export")
    tokens = tokens_for(model.cfg, pos=24)
    with torch.no_grad():
        ours = model(tokens)
    hf, info = GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    torch.testing.assert_close(hf_logits(hf.eval(), tokens), ours, rtol=1e-5, atol=1e-5)
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), ours, rtol=1e-5, atol=1e-5)
    # ... and this project reads it back bit for bit, from config.json
    loaded = gpt2_small.load_model(directory)
    assert loaded.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(directory)("Hello world")["input_ids"] == [15496, 995]


def test_export_hf_writes_what_save_pretrained_writes_and_ties_a_tied_unembedding(tiny_checkpoint, tmp_path):
    source, hf = tiny_checkpoint  # saved by GPT2LMHeadModel.save_pretrained: tied, no lm_head.weight
    directory = gpt2_small.export_hf(Transformer.from_pretrained(source), tmp_path / "export", tokenizer=False)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    theirs, ours = load_file(source / "model.safetensors"), load_file(directory / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(directory / "model.safetensors", "pt") as b:
        assert b.metadata() == a.metadata() == {"format": "pt"}  # as save_pretrained writes it
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["bos_token_id"] == config["eos_token_id"] == 50256  # <|endoftext|>
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon"):
        assert config[key] == hf.config.to_dict()[key], key


def test_export_hf_config_states_an_untied_unembedding_its_dtype_and_no_dropout(tmp_path):
    """What transformers 5 and the bridge would get right without it, as they read lm_head.weight
    whatever the flag says, but other readers of config.json do not: a loader that ties by the
    flag would drop the trained W_U, and GPT2Config's default dropout (0.1) would make a
    Hugging Face training run of the export a different function from this model."""
    model = _trained_looking_model().bfloat16()
    directory = gpt2_small.export_hf(model, tmp_path / "export", tokenizer=False)
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head.weight" in load_file(directory / "model.safetensors")
    assert config["dtype"] == "bfloat16"
    assert (config["resid_pdrop"], config["embd_pdrop"], config["attn_pdrop"]) == (0.0, 0.0, 0.0)
    hf = GPT2LMHeadModel.from_pretrained(directory)
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.lm_head.weight, model.unembed.W_U.T) and not torch.equal(hf.lm_head.weight, model.embed.W_E)


def test_export_hf_refuses_an_unembedding_bias_unless_told_to_drop_it(tmp_path):
    model = _trained_looking_model(seed=1)
    with torch.no_grad():
        model.unembed.b_U.normal_()
    with pytest.raises(ValueError, match=r"b_U is not zero \(largest \|b_U\| .*drop_unembed_bias=True"):
        gpt2_small.export_hf(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    directory = gpt2_small.export_hf(model, tmp_path / "dropped", drop_unembed_bias=True, tokenizer=False)
    tokens = tokens_for(model.cfg)
    with torch.no_grad():
        expected = model(tokens) - model.unembed.b_U
    torch.testing.assert_close(hf_logits(GPT2LMHeadModel.from_pretrained(directory).eval(), tokens), expected)


def test_export_hf_expands_a_directory_under_home(home):
    model = Transformer(NANO)
    assert gpt2_small.export_hf(model, "~/exported", tokenizer=False) == home / "exported"
    assert sorted(p.name for p in (home / "exported").iterdir()) == ["config.json", "model.safetensors"]
    assert not Path("~").exists()


def test_export_hf_refuses_what_it_cannot_write(tmp_path, without_shape_checks):
    model = Transformer(NANO)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; export_hf writes a directory"):
        gpt2_small.export_hf(model, tmp_path / "file")
    with pytest.raises(
        ValueError, match=r"/file/a/b lies under .*/file, which is a file; export_hf writes a directory$"
    ):
        gpt2_small.export_hf(model, tmp_path / "file" / "a" / "b")
    model.save(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"holds a gpt2_small checkpoint or training run \(gpt2_small_config.json\)"):
        gpt2_small.export_hf(model, tmp_path / "ours")
    model.save(tmp_path / "run" / "checkpoints" / "step-0000001")  # a training run's output directory
    with pytest.raises(ValueError, match=r"holds a gpt2_small checkpoint or training run \(checkpoints\)"):
        gpt2_small.export_hf(model, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(TypeError, match="model must be a gpt2_small.Transformer, got GPT2LMHeadModel"):
        gpt2_small.export_hf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), tmp_path / "x")
    with pytest.raises(TypeError, match="tokenizer must be True or False, got 'yes'"):
        gpt2_small.export_hf(model, tmp_path / "x", tokenizer="yes")


def test_export_hf_and_save_write_parameters_that_share_memory(tmp_path):
    """A weight-sharing experiment ties parameters by assignment; safetensors refuses tensors that
    share memory, and Transformer.save raised its RuntimeError. Each is now written as a copy."""
    model = _trained_looking_model(seed=2)
    model.blocks[1].ln1.w = model.blocks[0].ln1.w
    model.blocks[1].mlp.W_in = model.blocks[0].mlp.W_in
    model.save(tmp_path / "ours")
    loaded = Transformer.load(tmp_path / "ours")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.blocks[1].mlp.W_in.data_ptr() != loaded.blocks[0].mlp.W_in.data_ptr()  # equal, no longer tied
    directory = gpt2_small.export_hf(model, tmp_path / "hf", tokenizer=False)
    tokens = tokens_for(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(GPT2LMHeadModel.from_pretrained(directory).eval(), tokens), model(tokens))


def test_export_hf_names_endoftext_only_in_a_vocabulary_that_has_it(tmp_path, without_shape_checks):
    """GPT2Config's default bos/eos is 50256, which transformers warns is outside a smaller vocabulary."""
    model = Transformer(NANO)
    config = json.loads((gpt2_small.export_hf(model, tmp_path / "x", tokenizer=False) / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
