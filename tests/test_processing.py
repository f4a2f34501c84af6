"""process_weights against TransformerLens 4's TransformerBridge.process_weights on the same
checkpoint, and each rewrite's own promise against the unprocessed model."""

import copy

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from gpt2_small import Transformer, process_weights

REL_TOL = 1e-5
STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
# The bridge's stacked weights after its processing. Not b_in and b_out: TransformerLens 4.3's
# bridge reports the checkpoint's MLP biases there while its forward pass uses the processed
# ones; those are checked through hook_pre and the residual stream instead.
BRIDGE_WEIGHTS = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in", "W_out", "W_U", "b_U")
# What no rewrite may change: LayerNorm outputs, attention and the MLP's hidden layer.
INVARIANT_HOOKS = ("ln1.hook_normalized", "ln1.hook_scale", "ln2.hook_normalized", "ln2.hook_scale",
                   "attn.hook_q", "attn.hook_k", "attn.hook_attn_scores", "attn.hook_pattern",
                   "mlp.hook_pre", "mlp.hook_post")  # fmt: skip


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).double().norm() / expected.double().norm())


def processed_bridge(directory, **steps):
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
    bridge.process_weights(**steps)
    return bridge


def assert_same_run(ours: tuple, theirs: tuple) -> None:
    """Logits and every hook both caches hold: ||ours - theirs|| / ||theirs|| <= REL_TOL, and
    elementwise within 1e-4 (after 12 layers the float32 bridge itself is ~6e-5 off exactly)."""
    (our_logits, our_cache), (logits, cache) = ours, theirs
    shared = [name for name in our_cache if name in cache]
    assert len(shared) == len(our_cache)  # every hook of ours has its counterpart
    for name in shared:
        assert rel_error(our_cache[name], cache[name]) <= REL_TOL, name
        torch.testing.assert_close(our_cache[name], cache[name], rtol=1e-4, atol=1e-4, msg=name)
    assert rel_error(our_logits, logits) <= REL_TOL
    torch.testing.assert_close(our_logits, logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_processed_model_runs_as_the_processed_bridge(ref):
    bridge = processed_bridge(ref.directory)
    model = process_weights(copy.deepcopy(ref.model))
    assert_same_run(model.run_with_cache(ref.tokens), bridge.run_with_cache(ref.tokens))
    for name in BRIDGE_WEIGHTS:
        expected = getattr(bridge, name)
        torch.testing.assert_close(getattr(model, name), expected, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("step", STEPS)
@torch.no_grad()
def test_each_step_alone_runs_as_on_the_bridge(tiny_checkpoint, step):
    directory, _ = tiny_checkpoint
    only = {name: name == step for name in STEPS}
    tokens = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(0))
    model = process_weights(Transformer.from_pretrained(directory), **only)
    unprocessed = Transformer.from_pretrained(directory)
    assert_same_run(model.run_with_cache(tokens), processed_bridge(directory, **only).run_with_cache(tokens))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, unprocessed.get_parameter(n))]
    assert changed  # the step did something, so the comparison above is not of two unprocessed models


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    tokens = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(1))
    unprocessed = Transformer.from_pretrained(directory)
    with torch.no_grad():
        return unprocessed, unprocessed.run_with_cache(tokens), tokens


def run_processed(pair, **steps) -> tuple[Transformer, torch.Tensor, dict]:
    unprocessed, _, tokens = pair
    model = process_weights(copy.deepcopy(unprocessed), **steps)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return model, logits, cache


@pytest.mark.parametrize("step", STEPS)
def test_each_step_keeps_the_log_probs_and_what_reads_the_layernorms(pair, step):
    _, (logits, cache), _ = pair
    _, new_logits, new_cache = run_processed(pair, **{name: name == step for name in STEPS})
    assert rel_error(new_logits.log_softmax(-1), logits.log_softmax(-1)) <= REL_TOL
    for layer in range(2):
        for hook in INVARIANT_HOOKS:
            name = f"blocks.{layer}.{hook}"
            torch.testing.assert_close(new_cache[name], cache[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fold_ln_leaves_identity_layernorms_and_the_same_logits(pair):
    unprocessed, (logits, _), _ = pair
    model, new_logits, _ = run_processed(pair, center_writing_weights=False, center_unembed=False,
                                         fold_value_biases=False)  # fmt: skip
    for ln in (*(model.blocks[i].ln1 for i in range(2)), *(model.blocks[i].ln2 for i in range(2)), model.ln_final):
        assert torch.equal(ln.w, torch.ones_like(ln.w)) and torch.equal(ln.b, torch.zeros_like(ln.b))
    assert not torch.equal(unprocessed.ln_final.w, torch.ones_like(unprocessed.ln_final.w))  # they were not before
    assert rel_error(new_logits, logits) <= REL_TOL  # not only the log-probs: no step here shifts logits
    # The reading weights come out centred over d_model: the LayerNorm's output has zero mean there.
    assert model.W_Q.mean(dim=2).abs().max() < 1e-6 and model.W_in.mean(dim=1).abs().max() < 1e-6
    assert model.W_U.mean(dim=0).abs().max() < 1e-6


def test_center_writing_weights_centres_the_residual_stream(pair):
    _, (_, cache), _ = pair
    _, _, new_cache = run_processed(pair, fold_ln=False, center_unembed=False, fold_value_biases=False)
    for name in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"):
        assert new_cache[name].mean(dim=-1).abs().max() < 1e-5, name
        assert cache[name].mean(dim=-1).abs().max() > 1e-3, name  # it was not centred before
        # The stream is what it was, less its mean over d_model.
        torch.testing.assert_close(new_cache[name], cache[name] - cache[name].mean(dim=-1, keepdim=True))


def test_center_unembed_centres_each_positions_logits(pair):
    _, (logits, _), _ = pair
    _, new_logits, _ = run_processed(pair, fold_ln=False, center_writing_weights=False, fold_value_biases=False)
    assert new_logits.mean(dim=-1).abs().max() < 1e-5
    assert logits.mean(dim=-1).abs().max() > 1e-3
    torch.testing.assert_close(new_logits, logits - logits.mean(dim=-1, keepdim=True))


def test_fold_value_biases_moves_b_V_into_b_O(pair):
    unprocessed, (logits, cache), _ = pair
    model, new_logits, new_cache = run_processed(pair, fold_ln=False, center_writing_weights=False,
                                                 center_unembed=False)  # fmt: skip
    assert not model.b_V.any() and unprocessed.b_V.abs().min() > 0
    # hook_v and hook_z lack b_V now; attn_out, which adds b_V W_O back through b_O, does not change.
    torch.testing.assert_close(new_cache["blocks.1.attn.hook_v"], cache["blocks.1.attn.hook_v"] - unprocessed.b_V[1])
    torch.testing.assert_close(new_cache["blocks.1.hook_attn_out"], cache["blocks.1.hook_attn_out"])
    assert rel_error(new_logits, logits) <= REL_TOL


def test_processing_twice_is_processing_once(pair):
    once, _, _ = run_processed(pair)
    twice = process_weights(copy.deepcopy(once))
    for name, param in twice.named_parameters():
        torch.testing.assert_close(param, once.get_parameter(name), rtol=0, atol=1e-6, msg=name)


def test_processing_is_in_place_and_keeps_every_parameter_tensor(pair):
    model = copy.deepcopy(pair[0])
    before = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    assert process_weights(model) is model
    for name, p in model.named_parameters():
        assert p is before[name][0] and p.data_ptr() == before[name][1], name


def test_a_bfloat16_model_is_processed_in_float32(pair):
    """Folding in bf16 arithmetic would round every intermediate; the result must be the float32
    processing of the same bf16 weights, rounded once."""
    bf16 = copy.deepcopy(pair[0]).bfloat16()
    reference = process_weights(copy.deepcopy(bf16).float())
    model = process_weights(bf16)
    assert model.dtype == torch.bfloat16
    for name, param in model.named_parameters():
        assert torch.equal(param, reference.get_parameter(name).bfloat16()), name


def test_a_float64_model_is_processed_in_float64(pair):
    """Processing is exact in arithmetic, so in float64 the log-probs stay to float64 rounding; the
    weights were rounded to float32 (log-probs ~1e-7 off) and copied back."""
    model = copy.deepcopy(pair[0]).double()
    tokens = pair[2]
    with torch.no_grad():
        before = model(tokens).log_softmax(-1)
        process_weights(model)
        after = model(tokens).log_softmax(-1)
    assert model.dtype == torch.float64
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_refused(pair, without_shape_checks):
    model = copy.deepcopy(pair[0])
    with pytest.raises(TypeError, match="model must be a gpt2_small.Transformer"):
        process_weights(object())
    with pytest.raises(TypeError, match="fold_ln must be True or False, got 1"):
        process_weights(model, fold_ln=1)
    tied = copy.deepcopy(pair[0])
    tied.unembed.W_U = torch.nn.Parameter(tied.embed.W_E.T)  # a view: the same memory
    with pytest.raises(ValueError, match="W_U shares its memory with W_E"):
        process_weights(tied)
