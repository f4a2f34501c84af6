"""Sampling: equality with HF generate (greedy, left padding, beam search), the KV cache against
full recomputation, the statistics of each sampling rule, and the errors."""

import copy
import dataclasses
import gc
import inspect
import math
import re
import weakref
from collections.abc import Callable

import einops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

import gpt2_small
from gpt2_small import (
    EOT_ID,
    KVCache,
    SamplingSettings,
    Transformer,
    TransformerConfig,
    beam_search,
    generate,
    generate_text,
    get_tokenizer,
    pad_prompts,
    stream,
    stream_text,
    to_tokens,
)
from gpt2_small.sampling import (
    OTHER_SAMPLING_OPTIONS,
    banned_ngram_tokens,
    mask_padding_ids,
    process_logits,
    sample_next_token,
)
from gpt2_small.tokenizer import hf_tokenizer

REL_TOL = 1e-5


def hf_generate(hf: GPT2LMHeadModel, tokens, attention_mask=None, **kwargs) -> torch.Tensor:
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    eos = hf.config.eos_token_id
    return hf.generate(tokens, attention_mask=mask, do_sample=False, pad_token_id=eos, eos_token_id=eos, **kwargs)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm())


# --- equality with Hugging Face ---------------------------------------------------------------


def test_greedy_equals_hf_token_for_token(sampling_pair):
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(0))
    ours = generate(sampling_pair.model, tokens, 40, temperature=0)
    theirs = hf_generate(sampling_pair.hf, tokens, max_new_tokens=40)
    assert ours.shape == (3, 49)
    assert torch.equal(ours, theirs)


def test_greedy_stops_at_eos_and_pads_like_hf(small_vocab_pair):
    pair = small_vocab_pair
    tokens = torch.randint(0, 99, (6, 5), generator=torch.Generator().manual_seed(1))
    ours = generate(pair.model, tokens, 40, temperature=0, eos_token_id=pair.eos)
    theirs = hf_generate(pair.hf, tokens, max_new_tokens=40)
    assert torch.equal(ours, theirs)
    finished = (ours[:, 5:] == pair.eos).any(dim=1)
    assert finished.any() and not finished.all()  # eos reached by some rows: the path is exercised
    for row in ours[finished, 5:]:
        first = int((row == pair.eos).nonzero()[0])
        assert (row[first:] == pair.eos).all()  # padded with eos after finishing
    # When every row finishes, generation ends at the last row's eos, as HF's does.
    done = tokens[finished]
    ours = generate(pair.model, done, 40, temperature=0, eos_token_id=pair.eos)
    assert torch.equal(ours, hf_generate(pair.hf, done, max_new_tokens=40))
    last = max(int((row == pair.eos).nonzero()[0]) for row in ours[:, 5:])
    assert ours.shape[1] == 5 + last + 1 < 5 + 40
    assert len(list(stream(pair.model, done, 40, temperature=0, eos_token_id=pair.eos))) == last + 1


def test_left_padded_batch_equals_hf_and_each_prompt_alone(sampling_pair):
    model = sampling_pair.model
    prompts = [[464, 3290, 318, 257, 1332, 11, 290], [40, 1101, 257], [15496, 995, 13, 632, 318]]
    tokens, mask = pad_prompts(prompts)
    assert mask.tolist()[1] == [0, 0, 0, 0, 1, 1, 1]
    ours = generate(model, tokens, 32, temperature=0, attention_mask=mask)
    assert torch.equal(ours, hf_generate(sampling_pair.hf, tokens, mask, max_new_tokens=32))
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 32, temperature=0)
        assert torch.equal(alone[0, len(prompt) :], ours[row, tokens.shape[1] :])


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
                                      dict(temperature=1.3, top_k=10), dict(top_k=5, top_p=0.5)])  # fmt: skip
def test_sampling_with_a_seed_equals_hf_sampling_after_manual_seed(small_vocab_pair, settings):
    # One multinomial draw over the whole batch per step, as HF's: the same stream of random
    # numbers picks the same tokens, with rows of left padding that end at eos on the way.
    pair = small_vocab_pair
    tokens, mask = pad_prompts([[1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=pair.eos)
    stopped = 0
    for seed in range(4):
        torch.manual_seed(seed)
        expected = pair.hf.generate(tokens, attention_mask=mask, do_sample=True, max_new_tokens=30,
                                    pad_token_id=pair.eos, eos_token_id=pair.eos,
                                    **{"top_k": 0, "top_p": 1.0, **settings})  # fmt: skip
        ours = generate(pair.model, tokens, 30, seed=seed, attention_mask=mask, eos_token_id=pair.eos, **settings)
        assert torch.equal(ours, expected), seed
        stopped += int((ours[:, -1] == pair.eos).sum())
    assert stopped > 0  # some row ended at eos and was padded


# Prompts from seeds 6 and 18: there HF's early-stopping heuristic decides the result (the best running
# beam's score, penalised by its length, against the worst finished one); found by mutation, as
# leaving the penalty out of that comparison changed these rows and none of seed 2's. Comparing with
# the best finished score instead of the worst changed none of those either, but changes (2, 1.0, 18).
@pytest.mark.parametrize(
    "num_beams,length_penalty,seed",
    [(4, 1.0, 2), (3, 0.5, 2), (4, 2.0, 2), (2, -1.0, 2), (4, 2.0, 6), (4, 3.0, 18), (2, 1.0, 18)],
)
def test_beam_search_equals_hf(small_vocab_pair, num_beams, length_penalty, seed):
    pair = small_vocab_pair
    tokens = torch.randint(0, 99, (3, 6), generator=torch.Generator().manual_seed(seed))
    ours = beam_search(pair.model, tokens, num_beams, 25, length_penalty=length_penalty, eos_token_id=pair.eos)
    theirs = hf_generate(
        pair.hf, tokens, num_beams=num_beams, max_new_tokens=25, length_penalty=length_penalty,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(ours.tokens, theirs.sequences)
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.scores, ours.log_probs / ours.lengths.float() ** length_penalty)


def test_beam_search_hypotheses_end_at_eos_on_this_model(small_vocab_pair):
    # Makes the HF comparison above meaningful: eos-finished hypotheses win some rows.
    pair = small_vocab_pair
    tokens = torch.randint(0, 99, (3, 6), generator=torch.Generator().manual_seed(2))
    ours = beam_search(pair.model, tokens, 4, 25, length_penalty=0.5, eos_token_id=pair.eos)
    assert (ours.lengths < 25).any()
    for row, length in zip(ours.tokens, ours.lengths.tolist(), strict=True):
        if length < 25:
            assert row[6 + length - 1] == pair.eos


def test_beam_search_output_is_as_long_as_its_longest_hypothesis(small_vocab_pair):
    """With eos favoured, every row's best hypothesis ends well before max_new_tokens: the tokens are
    then cut after the longest of them, as HF's sequences are, not padded out to max_new_tokens."""
    pair = small_vocab_pair
    eos_bias = torch.zeros(100)
    eos_bias[pair.eos] = 2.0
    handles = [pair.model.unembed.register_forward_hook(lambda module, args, logits: logits + eos_bias),
               pair.hf.lm_head.register_forward_hook(lambda module, args, logits: logits + eos_bias)]  # fmt: skip
    try:
        tokens = torch.randint(0, 99, (3, 6), generator=torch.Generator().manual_seed(2))
        ours = beam_search(pair.model, tokens, 3, 25, eos_token_id=pair.eos)
        theirs = hf_generate(pair.hf, tokens, num_beams=3, max_new_tokens=25)
    finally:
        for handle in handles:
            handle.remove()
    assert int(ours.lengths.max()) < 25
    assert ours.tokens.shape == (3, 6 + int(ours.lengths.max()))
    assert torch.equal(ours.tokens, theirs)


def test_beam_search_no_repeat_ngram_equals_hf(small_vocab_pair):
    pair = small_vocab_pair
    tokens = torch.randint(0, 99, (2, 6), generator=torch.Generator().manual_seed(3))
    ours = beam_search(pair.model, tokens, 3, 30, no_repeat_ngram_size=2, eos_token_id=pair.eos)
    assert torch.equal(
        ours.tokens, hf_generate(pair.hf, tokens, num_beams=3, max_new_tokens=30, no_repeat_ngram_size=2)
    )
    for row in ours.tokens.tolist():
        bigrams = [tuple(row[i : i + 2]) for i in range(len(row) - 1) if pair.eos not in row[i : i + 2]]
        assert len(bigrams) == len(set(bigrams))


BEAM_PROMPTS = [[3, 14, 15, 92, 65, 35], [89, 79], [5, 6, 7, 8]]


def beam_search_alone(pair, prompt, *args, **kwargs) -> tuple[list[int], float]:
    """A prompt's generated tokens and score, beam-searched in a batch of its own."""
    alone = beam_search(pair.model, torch.tensor([prompt]), *args, eos_token_id=pair.eos, **kwargs)
    return alone.tokens[0, len(prompt) : len(prompt) + int(alone.lengths[0])].tolist(), float(alone.scores[0])


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("num_beams,length_penalty", [(3, 1.0), (4, 0.5)])
def test_beam_search_left_padded_batch_equals_hf_and_each_prompt_alone(
    small_vocab_pair, num_beams, length_penalty, use_kv_cache
):
    pair = small_vocab_pair
    tokens, mask = pad_prompts(BEAM_PROMPTS, pad_id=pair.eos)
    ours = beam_search(pair.model, tokens, num_beams, 20, length_penalty=length_penalty, eos_token_id=pair.eos,
                       attention_mask=mask, use_kv_cache=use_kv_cache)  # fmt: skip
    theirs = hf_generate(pair.hf, tokens, mask, num_beams=num_beams, max_new_tokens=20, length_penalty=length_penalty,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(ours.tokens, theirs.sequences)
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, rtol=1e-5, atol=1e-5)
    for row, prompt in enumerate(BEAM_PROMPTS):
        generated, score = beam_search_alone(pair, prompt, num_beams, 20, length_penalty=length_penalty)
        assert ours.tokens[row, tokens.shape[1] : tokens.shape[1] + int(ours.lengths[row])].tolist() == generated
        assert score == pytest.approx(float(ours.scores[row]), abs=1e-5)
    unmasked = beam_search(pair.model, tokens, num_beams, 20, length_penalty=length_penalty, eos_token_id=pair.eos)
    assert not torch.equal(unmasked.tokens, ours.tokens)  # the padding, attended to, changes the result


def test_beam_search_no_repeat_ngram_ignores_the_padding(small_vocab_pair):
    # Padded with the token that the second prompt's best hypothesis starts with, alone and with
    # no 1-gram repeated: counting the padding as HF does would forbid that token, and does.
    pair = small_vocab_pair
    generated, _ = beam_search_alone(pair, BEAM_PROMPTS[1], 3, 10, no_repeat_ngram_size=1)
    tokens, mask = pad_prompts(BEAM_PROMPTS, pad_id=generated[0])
    ours = beam_search(pair.model, tokens, 3, 10, no_repeat_ngram_size=1, eos_token_id=pair.eos, attention_mask=mask)
    start = tokens.shape[1]
    assert ours.tokens[1, start : start + int(ours.lengths[1])].tolist() == generated
    for row in (0, 2):
        expected, _ = beam_search_alone(pair, BEAM_PROMPTS[row], 3, 10, no_repeat_ngram_size=1)
        assert ours.tokens[row, start : start + int(ours.lengths[row])].tolist() == expected
    theirs = hf_generate(pair.hf, tokens, mask, num_beams=3, max_new_tokens=10, no_repeat_ngram_size=1)
    assert generated[0] not in theirs[1, start:].tolist()


def test_a_boolean_attention_mask_gives_what_the_integer_one_gives(small_vocab_pair):
    # As forward takes either; the signatures of generate, stream and beam_search once refused bool.
    pair = small_vocab_pair
    tokens, mask = pad_prompts([[1, 2, 3], [4, 5]], pad_id=pair.eos)

    def run(given):
        kwargs = {"attention_mask": given, "eos_token_id": pair.eos}
        greedy = generate(pair.model, tokens, 6, temperature=0, **kwargs)
        streamed = torch.stack(list(stream(pair.model, tokens, 6, temperature=0, stop_at_eos=False, **kwargs)), 1)
        return greedy, streamed, beam_search(pair.model, tokens, 2, 6, **kwargs).tokens

    for ours, expected in zip(run(mask.bool()), run(mask), strict=True):
        assert torch.equal(ours, expected)


def test_beam_search_refuses_right_padding(small_vocab_pair):
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="pad prompts on the left"):
        beam_search(small_vocab_pair.model, tokens, 2, 5, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_beam_search_with_one_beam_is_greedy(small_vocab_pair):
    pair = small_vocab_pair
    tokens = torch.randint(0, 99, (2, 4), generator=torch.Generator().manual_seed(4))
    beams = beam_search(pair.model, tokens, 1, 12, eos_token_id=pair.eos)
    greedy = generate(pair.model, tokens, 12, temperature=0, eos_token_id=pair.eos)
    assert torch.equal(beams.tokens, greedy[:, : beams.tokens.shape[1]])


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]  # "1 2" was followed by 3
    assert sorted(banned_ngram_tokens([5, 1, 5, 2, 5], 2)) == [1, 2]
    assert banned_ngram_tokens([1, 2, 3], 3) == []  # "2 3" never seen before
    assert banned_ngram_tokens([7], 3) == []


# --- the KV cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_kv_cache_logits_equal_full_recompute_at_every_step(sampling_pair, attn_impl, static):
    model = Transformer(TransformerConfig(**{**vars(sampling_pair.model.cfg), "attn_impl": attn_impl}))
    model.load_state_dict(sampling_pair.model.state_dict())
    tokens, mask = pad_prompts([[3, 14, 15, 92, 65, 35], [89, 79]])
    cache = KVCache.for_model(model, batch=2, max_pos=20, static=static)
    logits = model(tokens, attention_mask=mask, kv_cache=cache)
    full = model(tokens, attention_mask=mask)
    real = mask.bool()
    assert rel_error(logits[real], full[real]) <= REL_TOL
    for _ in range(14):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens, mask = torch.cat([tokens, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        logits = model(nxt, kv_cache=cache)
        full = model(tokens, attention_mask=mask)[:, -1:]
        assert rel_error(logits, full) <= REL_TOL
        torch.testing.assert_close(logits, full)
    assert cache.length == tokens.shape[1] == 20
    assert int(cache.cursor) == (20 if static else 0)  # only a static cache keeps its position on the device


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_kv_cache_for_a_bfloat16_model_holds_bfloat16_and_decodes_as_the_full_run(sampling_pair, static):
    """for_model takes the model's dtype: a float32 cache beside a bf16 model would hand attention
    float32 keys and values for bf16 queries."""
    model = copy.deepcopy(sampling_pair.model).to(torch.bfloat16)
    cache = KVCache.for_model(model, batch=1, max_pos=6, static=static)
    assert {t.dtype for t in (*cache.k, *cache.v)} == {torch.bfloat16}
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        model(tokens[:, :5], kv_cache=cache)
        logits = model(tokens[:, 5:], kv_cache=cache)
        full = model(tokens)[:, -1:]
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, full)  # bfloat16's default tolerances: rtol 1.6e-2, atol 1e-5


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_kv_cache_extended_by_several_positions_at_once_equals_the_full_run(sampling_pair, attn_impl, static, padded):
    """A chunked prefill: the cache grows by 3, 4, 2 and 1 positions. A chunk of several queries
    after cached keys is causal within itself (query i sees the new keys up to its own), the case
    one-token decoding never meets; without padding SDPA gets no mask tensor for it otherwise."""
    model = Transformer(TransformerConfig(**{**vars(sampling_pair.model.cfg), "attn_impl": attn_impl}))
    model.load_state_dict(sampling_pair.model.state_dict())
    rows = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [2, 71, 82, 81, 82, 84, 59, 4, 52, 35]]
    if padded:
        rows[1] = rows[1][3:]
    tokens, mask = pad_prompts(rows)
    full = model(tokens, attention_mask=mask)
    cache = KVCache.for_model(model, batch=2, max_pos=10, static=static)
    chunks, start = [], 0
    for size in (3, 4, 2, 1):
        chunk_mask = mask[:, start : start + size] if padded else None
        chunks.append(model(tokens[:, start : start + size], attention_mask=chunk_mask, kv_cache=cache))
        start += size
    real = mask.bool()
    torch.testing.assert_close(torch.cat(chunks, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_a_static_cache_under_bf16_autocast_gives_the_dynamic_caches_logits(sampling_pair):
    """Under autocast the keys and values arrive in bf16 and both layouts store them in the cache's
    float32. Before: the static cache's index_copy_ refused them, so on CUDA, where generation
    decodes on a static cache by default, any generate() under bf16 autocast failed at its first step."""
    tokens, mask = pad_prompts([[3, 14, 15, 92, 65, 35], [89, 79]])
    # The same tokens fed to both layouts, not each one's own argmax, which a near-tie could flip.
    fed = torch.tensor([[7, 1000], [42, 9], [50000, 77], [5, 5], [123, 31337]])

    def decode(static: bool, autocast: bool) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache.for_model(sampling_pair.model, batch=2, max_pos=12, static=static)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = [sampling_pair.model(tokens, attention_mask=mask, kv_cache=cache)[:, -1]]
            for step in fed:
                logits.append(sampling_pair.model(step[:, None], kv_cache=cache)[:, -1])
        assert cache.k[0].dtype == torch.float32
        return torch.stack(logits), cache

    (static, static_cache), (dynamic, dynamic_cache) = decode(static=True, autocast=True), decode(False, True)
    # Layer 0's keys and values come from the same products in both layouts: stored bit for bit.
    for cached in ("k", "v"):
        torch.testing.assert_close(getattr(static_cache, cached)[0], getattr(dynamic_cache, cached)[0], rtol=0, atol=0)
    # The logits to bf16 rounding (2**-8 relative): the static layout's attention spans all 12 slots,
    # the dynamic one's the filled ones, and CPUs without native bf16 (AVX2) round bf16 products
    # differently by shape (there: 5e-3 relative; a wrong slot would be off by the logits' own size).
    assert rel_error(static, dynamic) <= 1e-2
    assert rel_error(static, decode(static=True, autocast=False)[0]) > 1e-3  # autocast was on


def test_static_kv_cache_attends_over_every_slot_with_the_unfilled_ones_masked(sampling_pair):
    model = sampling_pair.model
    cache = KVCache.for_model(model, batch=1, max_pos=7, static=True)
    shapes, rows = [], []

    def record(pattern, hook):
        shapes.append(tuple(pattern.shape))
        rows.append(pattern[0, :, -1].clone())

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", record)]):
        model(torch.tensor([[10, 20, 30]]), kv_cache=cache)
        model(torch.tensor([[40]]), kv_cache=cache)
    assert shapes == [(1, 4, 3, 7), (1, 4, 1, 7)]
    assert (rows[1][:, 4:] == 0).all() and (rows[1][:, :4] > 0).all()  # slots 4-6 are not filled yet
    torch.testing.assert_close(rows[1].sum(dim=-1), torch.ones(4))
    assert cache.key_mask.tolist() == [[True] * 4 + [False] * 3]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_kv_cache_reset_serves_a_new_generation_with_edited_weights_in_the_same_buffers(sampling_pair, static):
    """After reset() a used cache gives a fresh cache's logits for another prompt, also when the
    weights were edited in place through .data (which no version counter sees), and keeps its
    buffers. Without the rebuild, the stacked W_Q/W_K/W_V kept from the first use would be stale."""
    model = copy.deepcopy(sampling_pair.model)
    cache = KVCache.for_model(model, batch=2, max_pos=10, static=static)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), kv_cache=cache)
        model(torch.tensor([[9], [10]]), kv_cache=cache)
        buffers = [t.data_ptr() for t in (*cache.k, *cache.v, cache.key_mask, *cache._weights[1])]
        model.blocks[1].attn.W_K.data.mul_(-2.0)
        model.blocks[1].attn.b_V.data.add_(0.5)
        cache.reset()
        assert cache.length == 0 and not cache.key_mask.any()

        tokens, mask = pad_prompts([[11, 12, 13], [14, 15]])
        fresh = KVCache.for_model(model, batch=2, max_pos=10, static=static)
        reused_logits = [model(tokens, attention_mask=mask, kv_cache=cache)[:, -1]]
        fresh_logits = [model(tokens, attention_mask=mask, kv_cache=fresh)[:, -1]]
        for token in (16, 17):
            step = torch.tensor([[token], [token]])
            reused_logits.append(model(step, kv_cache=cache)[:, -1])
            fresh_logits.append(model(step, kv_cache=fresh)[:, -1])
    torch.testing.assert_close(torch.stack(reused_logits), torch.stack(fresh_logits), rtol=0, atol=0)
    assert [t.data_ptr() for t in (*cache.k, *cache.v, cache.key_mask, *cache._weights[1])] == buffers
    torch.testing.assert_close(cache._weights[1][0], model.blocks[1].attn.stacked_qkv()[0], rtol=0, atol=0)


def test_cuda_graph_is_refused_where_it_cannot_run(sampling_pair):
    tokens = torch.tensor([[10, 20, 30]])
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device, got device cpu"):
        generate(sampling_pair.model, tokens, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        beam_search(sampling_pair.model, tokens, num_beams=2, max_new_tokens=3, cuda_graph=True)


def test_generation_records_no_autograd_graph(sampling_pair):
    """Every model call of a generation (prefill and steps) runs under no_grad, also when the
    generator function is wrapped by another decorator (here jaxtyping's runtime checks)."""
    model, tokens = sampling_pair.model, torch.tensor([[10, 20, 30]])
    recorded = []
    model.blocks[1].hook_resid_post.add_hook(lambda act, hook: recorded.append(act.requires_grad))
    try:
        generate(model, tokens, 4, temperature=0, stop_at_eos=False)
        beam_search(model, tokens, num_beams=2, max_new_tokens=3)
    finally:
        model.reset_hooks()
    assert len(recorded) == 4 + 3 and not any(recorded)


def test_release_decoding_state_takes_only_a_model(without_shape_checks):
    """Before: "cannot create weak reference to 'str' object", from the WeakKeyDictionary."""
    for not_a_model in ("gpt2", None):
        with pytest.raises(
            TypeError, match=rf"^model must be a gpt2_small.Transformer, got {type(not_a_model).__name__}$"
        ):
            gpt2_small.release_decoding_state(not_a_model)


def test_compile_is_refused_where_it_cannot_run(sampling_pair):
    model, tokens = sampling_pair.model, torch.tensor([[10, 20, 30]])
    with pytest.raises(ValueError, match="compile=True needs use_kv_cache=True"):
        generate(model, tokens, 3, compile=True, use_kv_cache=False)
    model.blocks[0].hook_resid_pre.add_hook(lambda act, hook: None)
    try:
        with pytest.raises(ValueError, match="compile=True with hooks attached"):
            beam_search(model, tokens, num_beams=2, max_new_tokens=3, compile=True)
    finally:
        model.reset_hooks()


@pytest.mark.slow
def test_compiled_decoding_step_gives_the_eager_tokens(small_vocab_pair, without_shape_checks):
    """compile=True against the eager step: greedy with left padding, seeded sampling with
    penalties, and beam search, each with left padding. All three have one cache shape, so one compilation serves them."""
    model, eos = small_vocab_pair.model, small_vocab_pair.eos
    tokens, mask = pad_prompts([[5, 6, 7, 8], [9, 10]], pad_id=eos)
    # The compiled step is one function for every generation, so an earlier test that compiled it
    # for this shape (in another test order) would leave nothing to compile here: start afresh.
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    greedy = generate(model, tokens, 20, temperature=0, attention_mask=mask, stop_at_eos=False, compile=True)
    assert torch.equal(greedy, generate(model, tokens, 20, temperature=0, attention_mask=mask, stop_at_eos=False))
    settings = {"top_k": 30, "top_p": 0.9, "freq_penalty": 0.5, "seed": 3, "stop_at_eos": False}
    sampled = generate(model, tokens, 20, attention_mask=mask, compile=True, **settings)
    assert torch.equal(sampled, generate(model, tokens, 20, attention_mask=mask, **settings))
    assert not torch.equal(sampled, greedy)
    # The padded prompt: its masked prefill goes into the static cache, whose key mask beams reorder.
    beam_kwargs = {"num_beams": 2, "max_new_tokens": 20, "eos_token_id": eos, "attention_mask": mask[1:]}
    beams = beam_search(model, tokens[1:], compile=True, **beam_kwargs)
    eager_beams = beam_search(model, tokens[1:], **beam_kwargs)
    assert torch.equal(beams.tokens, eager_beams.tokens)
    torch.testing.assert_close(beams.scores, eager_beams.scores, rtol=1e-5, atol=1e-6)

    # The compiled step ran (the test cannot pass on a silent eager fallback) and compiled once.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1


@pytest.mark.slow
def test_a_fast_generation_reuses_the_kept_cache_and_step_and_follows_weight_edits(
    small_vocab_pair, without_shape_checks
):
    """A second fast (here compiled) generation of the same shape reuses the first one's static
    cache and decoding step, and gives the eager tokens, also after an in-place weight edit; a new
    shape or moved parameters replace the kept state; release_decoding_state and deleting the
    model free it."""
    from gpt2_small.sampling import _KEPT

    model, eos = copy.deepcopy(small_vocab_pair.model), small_vocab_pair.eos
    tokens, mask = pad_prompts([[5, 6, 7, 8], [9, 10]], pad_id=eos)
    kwargs = {"temperature": 0, "attention_mask": mask, "stop_at_eos": False}
    first = generate(model, tokens, 20, compile=True, **kwargs)
    kept = _KEPT[model]
    cache, step = kept.cache, kept.step
    assert step is not None and not kept.busy
    assert torch.equal(generate(model, tokens, 20, compile=True, **kwargs), first)
    assert _KEPT[model] is kept and kept.cache is cache and kept.step is step

    with torch.no_grad():
        model.blocks[0].attn.W_V.data.mul_(-3.0)
        model.blocks[1].mlp.b_out.data.add_(torch.linspace(-2, 2, model.cfg.d_model))
    edited = generate(model, tokens, 20, compile=True, **kwargs)
    assert _KEPT[model] is kept and kept.cache is cache  # reused ...
    assert torch.equal(edited, generate(model, tokens, 20, **kwargs))  # ... with the edited weights
    assert not torch.equal(edited, first)

    # A state made under inference mode holds inference tensors, which refuse in-place updates
    # outside it: the next generation outside makes its own.
    assert gpt2_small.release_decoding_state(model)
    with torch.inference_mode():
        assert torch.equal(generate(model, tokens, 20, compile=True, **kwargs), edited)
    assert torch.equal(generate(model, tokens, 20, compile=True, **kwargs), edited)
    kept = _KEPT[model]

    generate(model, tokens, 19, compile=True, **kwargs)  # another max_pos: a new state replaces it
    assert _KEPT[model] is not kept and _KEPT[model].cache.max_pos == 4 + 19
    kept = _KEPT[model]
    one_row = generate(model, tokens[:1], 19, compile=True, **{**kwargs, "attention_mask": mask[:1]})
    assert _KEPT[model] is not kept and _KEPT[model].cache.batch == 1  # another batch size, likewise
    assert torch.equal(one_row, generate(model, tokens[:1], 19, **{**kwargs, "attention_mask": mask[:1]}))
    kept = _KEPT[model]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast, likewise: a graph would bake it in
        fast = generate(model, tokens[:1], 19, compile=True, **{**kwargs, "attention_mask": mask[:1]})
        assert torch.equal(fast, generate(model, tokens[:1], 19, **{**kwargs, "attention_mask": mask[:1]}))
    assert _KEPT[model] is not kept and _KEPT[model].cache.batch == 1
    assert gpt2_small.release_decoding_state(model) and model not in _KEPT
    assert not gpt2_small.release_decoding_state(model)

    generate(model, tokens, 20, compile=True, **kwargs)
    # Parameters that moved (loaded with assign=True, as from a file) make a new state of the same
    # shape: a CUDA graph captured on the old storage would go on reading it.
    kept = _KEPT[model]
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    assert torch.equal(generate(model, tokens, 20, compile=True, **kwargs), edited)
    assert _KEPT[model] is not kept and _KEPT[model].cache.max_pos == kept.cache.max_pos
    alive, kept_states = weakref.ref(model), len(_KEPT)
    del model
    gc.collect()
    assert alive() is None and len(_KEPT) == kept_states - 1


@pytest.mark.slow
def test_interleaved_fast_streams_of_one_shape_do_not_share_a_cache(small_vocab_pair, without_shape_checks):
    """Two streams of one model and shape, advanced in turn: the second finds the kept state busy
    and decodes with one of its own, so each gives what it gives alone."""
    from gpt2_small.sampling import _KEPT

    model, eos = small_vocab_pair.model, small_vocab_pair.eos
    a, mask = pad_prompts([[5, 6, 7, 8], [9, 10]], pad_id=eos)
    b = torch.tensor([[11, 12, 13, 14], [15, 16, 17, 18]])
    kwargs = {"temperature": 0, "stop_at_eos": False, "compile": True}
    alone_a = generate(model, a, 20, attention_mask=mask, **kwargs)[:, 4:]
    alone_b = generate(model, b, 20, **kwargs)[:, 4:]
    assert not torch.equal(alone_a, alone_b)
    kept = _KEPT[model]
    pairs = list(zip(stream(model, a, 20, attention_mask=mask, **kwargs), stream(model, b, 20, **kwargs), strict=True))
    assert torch.equal(torch.stack([x for x, _ in pairs], dim=1), alone_a)
    assert torch.equal(torch.stack([y for _, y in pairs], dim=1), alone_b)
    assert _KEPT[model] is kept  # the second stream's own state did not evict the kept one


def test_compiled_decoding_step_writes_the_cache_in_place(without_shape_checks):
    """The compiled step writes each new key and value into the cache's own storage, and never
    allocates a buffer the size of a cache layer: an in-place write into a view of one larger
    cache tensor compiles into a copy of the whole cache at every step (the layout this replaced)."""
    from torch._inductor.utils import run_and_get_code

    from gpt2_small.sampling import _decode_step

    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=101, n_ctx=32)
    model = Transformer(cfg).eval()
    batch, max_pos = 3, 13  # shapes that appear nowhere else in the step
    cache = KVCache.for_model(model, batch, max_pos, static=True)
    storage = [t.data_ptr() for t in (*cache.k, *cache.v)]
    with torch.no_grad():
        model(torch.randint(0, 101, (batch, 5)), kv_cache=cache)
        step = torch.compile(_decode_step, fullgraph=True)
        with torch._inductor.config.patch(fx_graph_cache=False):
            logits, code = run_and_get_code(step, model, torch.randint(0, 101, (batch, 1)), cache)
        assert int(cache.cursor) == 6
        assert all(k[:, 5].abs().sum() > 0 for k in (*cache.k, *cache.v))  # slot 5 written ...
        assert all(k[:, 6:].abs().sum() == 0 for k in (*cache.k, *cache.v))  # ... and nothing after it
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == storage
    assert logits.shape == (batch, 101)
    source = "\n".join(code)
    assert "def call(" in source  # the inductor output was captured
    layer_shape = f"({batch}, {max_pos}, {cfg.n_heads}, {cfg.d_head})"
    assert "assert_size_stride(arg" in source and layer_shape in source  # the cache layers are inputs
    assert not re.search(r"empty_strided_\w+\(" + re.escape(layer_shape), source)  # and never copied


def test_blocked_keys_masks_later_keys_and_padding_but_not_a_querys_own_key():
    key_mask = torch.tensor([[False, True, True, True, False]])  # slot 4 not filled
    blocked = gpt2_small.blocked_keys(torch.tensor([0, 2]), key_mask)
    assert blocked.shape == (1, 1, 2, 5)
    # Query 0 is padding: it sees only its own key. Query 2 sees keys 1 and 2.
    assert blocked[0, 0].tolist() == [[False, True, True, True, True], [True, False, False, True, True]]


def test_left_padding_leaves_real_positions_logits_unchanged(sampling_pair):
    model = sampling_pair.model
    prompt = torch.tensor([[464, 3290, 318, 257]])
    padded, mask = pad_prompts([[1, 2, 3, 4, 5, 6], prompt[0].tolist()])
    alone = model(prompt)
    in_batch = model(padded, attention_mask=mask)[1:, 2:]
    assert rel_error(in_batch, alone) <= REL_TOL
    assert not torch.isnan(model(padded, attention_mask=mask)).any()  # padding queries stay finite


def test_cache_on_and_off_give_identical_greedy_sequences(sampling_pair):
    tokens, mask = pad_prompts([[1, 2, 3, 4, 5], [6, 7]])
    on = generate(sampling_pair.model, tokens, 30, temperature=0, attention_mask=mask)
    off = generate(sampling_pair.model, tokens, 30, temperature=0, attention_mask=mask, use_kv_cache=False)
    assert torch.equal(on, off)


def test_kv_cache_with_a_pattern_hook_runs_eager_and_gives_the_same_tokens(sampling_pair):
    model = sampling_pair.model
    tokens = torch.tensor([[10, 20, 30]])
    shapes = []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: shapes.append(tuple(p.shape)))]):
        hooked = generate(model, tokens, 4, temperature=0)
    assert torch.equal(hooked, generate(model, tokens, 4, temperature=0))
    # The prompt once, then one query per step against the growing cache.
    assert shapes == [(1, 4, 3, 3), (1, 4, 1, 4), (1, 4, 1, 5), (1, 4, 1, 6)]


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["cache", "no-cache"])
def test_generation_unembeds_only_the_last_position(sampling_pair, use_kv_cache):
    """Sampling reads the last position's logits alone, so the prompt's other positions never go
    through ln_final and the unembedding (for a long prompt, most of a prefill's logits)."""
    model, tokens = sampling_pair.model, torch.tensor([[10, 20, 30, 40, 50], [60, 70, 80, 90, 100]])
    shapes = []
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: shapes.append(tuple(x.shape[:2])))]):
        generate(model, tokens, 3, temperature=0, stop_at_eos=False, use_kv_cache=use_kv_cache)
        beam_search(model, tokens[:1], num_beams=2, max_new_tokens=2, use_kv_cache=use_kv_cache)
    # generate: the prompt, then 2 steps, 2 rows each; beam search: the same with 2 beams of 1 prompt
    assert shapes == [(2, 1)] * 5


def test_kv_cache_reorder_selects_batch_items(sampling_pair):
    model = sampling_pair.model
    cache = KVCache.for_model(model, batch=3, max_pos=8)
    model(torch.tensor([[1, 2], [3, 4], [5, 6]]), kv_cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))
    logits = model(torch.tensor([[7], [8], [9]]), kv_cache=cache)
    expected = model(torch.tensor([[5, 6, 7], [5, 6, 8], [1, 2, 9]]))[:, -1:]
    assert rel_error(logits, expected) <= REL_TOL
    # One index would broadcast to every item in the copy; the cache keeps its batch size.
    with pytest.raises(ValueError, match="reorder index has 1 entries; the cache holds 3 sequences"):
        cache.reorder(torch.tensor([0]))


def test_kv_cache_reset_forgets_that_an_earlier_prompt_was_padded(sampling_pair):
    """Otherwise every later generation in the same cache pays for a key mask (and loses flash
    attention) although none of its positions is padding."""
    model = sampling_pair.model
    cache = KVCache.for_model(model, batch=2, max_pos=8)
    tokens, mask = pad_prompts([[1, 2, 3], [4, 5]])
    with torch.no_grad():
        model(tokens, attention_mask=mask, kv_cache=cache)
        assert cache.padded
        cache.reset()
        assert not cache.padded
        model(torch.tensor([[1, 2], [3, 4]]), kv_cache=cache)
        assert not cache.padded


def test_kv_cache_keeps_built_weights_only_while_autograd_is_off(sampling_pair):
    """A weight built while autograd records carries that call's graph, which a backward frees and
    a later step would then reach; with autograd off it is built once per cache."""
    cache = KVCache.for_model(sampling_pair.model, batch=1, max_pos=4)
    builds = []

    def build():
        builds.append(1)
        return (torch.ones(2, requires_grad=True) * 2,)

    owner = sampling_pair.model.blocks[0].attn
    cache.weights(0, owner, build)
    cache.weights(0, owner, build)
    assert len(builds) == 2
    with torch.no_grad():
        first, again = cache.weights(0, owner, build), cache.weights(0, owner, build)
    assert len(builds) == 3 and again[0] is first[0] and not first[0].requires_grad


def test_a_kv_cache_carried_to_another_model_gives_it_its_own_weights():
    """A cache filled by one model and continued by another of the same shape (its keys and values
    carried over, as an experiment may) had handed the second model the first one's kept
    W_Q/W_K/W_V, silently. Reference: the same steps while autograd records, where no weights
    are kept. Back on the first model, its own weights are used again."""
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, d_vocab=100, n_ctx=16)
    first, second = (Transformer(cfg).eval() for _ in range(2))
    tokens = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    steps = {}
    for mode in ("kept", "built"):
        cache = KVCache.for_model(first, batch=2, max_pos=8)
        with torch.set_grad_enabled(mode == "built"):
            first(tokens, kv_cache=cache)
            steps[mode] = [
                second(tokens[:, :1], kv_cache=cache).detach(),
                first(tokens[:, 1:2], kv_cache=cache).detach(),
            ]
    for name, kept, built in zip(["second", "first again"], steps["kept"], steps["built"], strict=True):
        torch.testing.assert_close(kept, built, rtol=1e-6, atol=1e-6, msg=name)


def test_forward_names_a_kv_cache_of_another_dtype():
    """Before: attention's "Expected query, key, and value to have the same dtype" from block 0."""
    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=100, n_ctx=16)
    model = Transformer(cfg).eval()
    for cache, held in [(KVCache(cfg, 1, 8, dtype=torch.float64), "float64"), (KVCache(cfg, 1, 8), "float32")]:
        if held == "float32":
            model.to(torch.bfloat16)
        message = f"kv_cache holds torch.{held} keys and values on cpu, the model's parameters are {model.dtype} on cpu"
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            model(torch.tensor([[1, 2]]), kv_cache=cache)
    model(torch.tensor([[1, 2]]), kv_cache=KVCache.for_model(model, 1, 8))  # for_model's matches


def test_forward_names_a_kv_cache_of_another_type(sampling_pair, without_shape_checks):
    with pytest.raises(TypeError, match="kv_cache must be a KVCache, got dict"):
        sampling_pair.model(torch.tensor([[1, 2]]), kv_cache={})


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_kv_cache_reorder_carries_each_items_padding_along(sampling_pair, static):
    """Across differently padded items the key mask must move with the keys and values (beam search
    only reorders among one prompt's beams, whose padding is the same, so it cannot show this)."""
    model = sampling_pair.model
    tokens, mask = pad_prompts([[1, 2, 3, 4, 5], [6, 7]])
    cache = KVCache.for_model(model, batch=2, max_pos=8, static=static)
    model(tokens, attention_mask=mask, kv_cache=cache)
    cache.reorder(torch.tensor([1, 0]))
    logits = model(torch.tensor([[8], [9]]), kv_cache=cache)
    expected = torch.cat([model(torch.tensor([[6, 7, 8]]))[:, -1:], model(torch.tensor([[1, 2, 3, 4, 5, 9]]))[:, -1:]])
    assert rel_error(logits, expected) <= REL_TOL


def test_weight_edits_take_effect_in_the_next_generation(sampling_pair):
    # The KV cache keeps stacked QKV weights for one generation only; edits made through .data
    # (which no version counter sees) must show in the next one.
    model = copy.deepcopy(sampling_pair.model)
    tokens = torch.tensor([[464, 3290, 318]])
    before = generate(model, tokens, 12, temperature=0)
    for block in model.blocks:
        block.attn.W_V.data.neg_()
        block.attn.W_Q.data.mul_(3.0)
    after = generate(model, tokens, 12, temperature=0)
    fresh = Transformer(model.cfg)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(after, generate(fresh, tokens, 12, temperature=0))
    assert not torch.equal(before, after)


def test_stacked_qkv_is_laid_out_for_the_matrix_multiply():
    attn = (
        Transformer(TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, n_ctx=8)).blocks[0].attn
    )
    with torch.no_grad():
        for bias in (attn.b_Q, attn.b_K, attn.b_V):
            bias.normal_()  # zero at initialisation, which would match any order
    W_QKV, b_QKV = attn.stacked_qkv()
    assert W_QKV.shape == (32, 3 * 32) and b_QKV.shape == (3 * 32,)
    W = einops.rearrange(W_QKV, "d_model (qkv n_heads d_head) -> qkv n_heads d_model d_head", qkv=3, n_heads=2)
    b = einops.rearrange(b_QKV, "(qkv n_heads d_head) -> qkv n_heads d_head", qkv=3, n_heads=2)
    assert torch.equal(W[0], attn.W_Q) and torch.equal(W[1], attn.W_K) and torch.equal(W[2], attn.W_V)
    assert torch.equal(b[0], attn.b_Q) and torch.equal(b[1], attn.b_K) and torch.equal(b[2], attn.b_V)
    assert W_QKV.is_contiguous()  # the GEMM reads it without a copy


# --- sampling rules, statistically ------------------------------------------------------------

N = 200_000
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def empirical(settings: SamplingSettings, logits=LOGITS, counts=None, seed=0) -> torch.Tensor:
    rows = logits.expand(N, -1)
    draws = sample_next_token(rows, settings, None if counts is None else counts.expand(N, -1),
                              torch.Generator().manual_seed(seed))  # fmt: skip
    return torch.bincount(draws, minlength=logits.numel()).double() / N


def assert_frequencies(freq: torch.Tensor, probs: torch.Tensor) -> None:
    # 5 standard errors of a binomial proportion, per token.
    tol = 5 * torch.sqrt(probs.double() * (1 - probs.double()) / N) + 1e-9
    assert ((freq - probs.double()).abs() <= tol).all(), (freq, probs)


def test_temperature_divides_the_logits():
    for t in (0.5, 2.0):
        freq = empirical(SamplingSettings(temperature=t))
        assert_frequencies(freq, (LOGITS / t).softmax(-1))
        assert (freq - LOGITS.softmax(-1).double()).abs().max() > 0.05  # and it is not the T=1 distribution
    assert_frequencies(empirical(SamplingSettings(temperature=1.0)), LOGITS.softmax(-1))


def test_temperature_zero_is_argmax():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, SamplingSettings(temperature=0)), logits.argmax(-1))


def test_top_k_never_leaves_the_top_k():
    freq = empirical(SamplingSettings(top_k=3))
    assert (freq[3:] == 0).all() and (freq[:3] > 0).all()
    assert_frequencies(freq, torch.cat([LOGITS[:3].softmax(-1), torch.zeros(3)]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)  # 0.420 0.255 0.154 0.094 0.057 0.021: cumulative 0.420 0.674 0.829 0.922 0.979 1
    for p, kept in [(0.3, 1), (0.6, 2), (0.7, 3), (0.8, 3), (0.9, 4), (0.95, 5), (1.0, 6)]:
        processed = process_logits(LOGITS[None], SamplingSettings(top_p=p))[0]
        assert torch.isfinite(processed).sum() == kept, p
        assert probs[:kept].sum() >= p - 1e-6 and (kept == 1 or probs[: kept - 1].sum() < p)
    freq = empirical(SamplingSettings(top_p=0.7))
    assert_frequencies(freq, torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)]))


def test_top_p_stops_at_a_set_whose_mass_is_exactly_p():
    """The smallest set whose mass reaches p, equality included: with 8 tokens of probability 1/8 each
    (exact in float32), p = k/8 keeps exactly k tokens, not k + 1."""
    for k in (1, 2, 4, 6, 7):
        processed = process_logits(torch.zeros(1, 8), SamplingSettings(top_p=k / 8))[0]
        assert torch.isfinite(processed).sum() == k, k


def test_a_tiny_top_p_keeps_the_most_likely_token():
    """1 - 1e-9 rounds to 1 in float32, so every cumulative mass is <= 1 - p: the most likely token
    must be kept explicitly, or each row is all -inf and its softmax NaN."""
    logits = 3 * torch.randn(4, 50257, generator=torch.Generator().manual_seed(0))
    processed = process_logits(logits, SamplingSettings(top_p=1e-9))
    assert torch.equal(torch.isfinite(processed), F.one_hot(logits.argmax(-1), 50257).bool())
    assert torch.equal(sample_next_token(logits, SamplingSettings(top_p=1e-9)), logits.argmax(-1))


def hf_warped(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """HF generate(do_sample=True)'s warpers, in the order its _get_logits_processor appends them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    warped = warpers(None, logits)
    assert warped.dtype == torch.float32
    return warped


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("top_k, top_p", [(None, 0.5), (None, 0.9), (None, 0.99), (40, None), (1000, 0.99), (5, 0.3)])
def test_sampling_distribution_equals_hfs_on_the_whole_vocabulary(temperature, top_k, top_p):
    # The same kept tokens and probabilities as HF's warpers on 50257 logits. With p near 1 the
    # nucleus ends among thousands of tiny probabilities, where float32 sums taken from the most
    # likely end lose the tail's mass: that once dropped a token or two of the nucleus per row.
    logits = 3 * torch.randn(8, 50257, generator=torch.Generator().manual_seed(0))
    expected = hf_warped(logits.clone(), temperature, top_k, top_p)
    ours = process_logits(logits, SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    kept = torch.isfinite(ours).sum(dim=-1)
    assert 1 < int(kept.max()) and int(kept.max()) < 50257  # more than the argmax was kept, and not everything
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), rtol=1e-6, atol=1e-9)


def test_top_k_keeps_every_token_tied_with_the_kth_as_hf_does():
    # Logits of a bf16 model tie often; HF keeps every token whose logit reaches the k-th largest.
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, 0.0]])
    kept = torch.isfinite(process_logits(logits, SamplingSettings(top_k=2)))
    assert kept.tolist() == [[True, True, True, False, True, False]]
    assert torch.equal(kept, torch.isfinite(hf_warped(logits.clone(), 1.0, 2, None)))
    assert torch.isfinite(process_logits(logits, SamplingSettings(top_k=1))).sum() == 1  # no tie at the top


def test_penalties_lower_repeated_tokens_as_documented():
    counts = torch.tensor([3.0, 0.0, 1.0, 0.0, 0.0, 2.0])
    settings = SamplingSettings(freq_penalty=0.5, presence_penalty=0.3)
    expected = (LOGITS - 0.5 * counts - 0.3 * (counts > 0).float()).softmax(-1)
    torch.testing.assert_close(process_logits(LOGITS[None], settings, counts[None])[0].softmax(-1), expected)
    freq = empirical(settings, counts=counts)
    assert_frequencies(freq, expected)
    assert freq[0] < LOGITS.softmax(-1)[0] - 0.1  # the most repeated token lost the most
    # Step 2 before step 3: the temperature divides the penalised logits, penalties included.
    hot = dataclasses.replace(settings, temperature=2.0)
    torch.testing.assert_close(
        process_logits(LOGITS[None], hot, counts[None])[0], (LOGITS - 0.5 * counts - 0.3 * (counts > 0).float()) / 2
    )


def test_penalties_count_no_left_padding(small_vocab_pair):
    """A padded row generates what its prompt alone does, even when the pad id is the token that
    prompt goes on to choose: padding is not text, so it must not be penalised as repeated."""
    model, short = small_vocab_pair.model, [9, 10]
    penalties = dict(temperature=0, presence_penalty=1e4, freq_penalty=1.0, stop_at_eos=False)
    alone = generate(model, torch.tensor([short]), 12, **penalties)
    tokens, mask = pad_prompts([[5, 6, 7, 8, 11], short], pad_id=int(alone[0, len(short)]))
    batch = generate(model, tokens, 12, attention_mask=mask, **penalties)
    assert torch.equal(batch[1, tokens.shape[1] :], alone[0, len(short) :])


def test_presence_penalty_counts_the_prompt_and_the_generated_tokens(small_vocab_pair):
    pair = small_vocab_pair
    tokens = torch.tensor([[5, 6, 7, 8]])
    plain = generate(pair.model, tokens, 40, temperature=0, stop_at_eos=False)
    assert len(set(plain[0].tolist())) < 44  # greedy on this model repeats itself
    penalised = generate(pair.model, tokens, 40, temperature=0, presence_penalty=1e4, stop_at_eos=False)
    assert len(set(penalised[0].tolist())) == 44  # every token, prompt included, used at most once


def test_padded_vocabulary_ids_are_never_sampled():
    model = Transformer(
        TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, d_vocab=50304, n_ctx=32)
    )
    for padding_id in (50257, 50303):  # the first and the last
        with torch.no_grad():
            model.unembed.b_U.zero_()
            model.unembed.b_U[padding_id] = 1e4  # it would win every draw if it were allowed
        out = generate(model, torch.tensor([[1, 2]]), 20, temperature=1.0, seed=0)
        assert (out < 50257).all()
        assert (beam_search(model, torch.tensor([[1, 2]]), 3, 6).tokens < 50257).all()
        assert model(torch.tensor([[1, 2]]))[0, -1].argmax() == padding_id
    masked = mask_padding_ids(torch.zeros(2, 50304))
    assert torch.equal(torch.isinf(masked), (torch.arange(50304) >= 50257).expand(2, -1))
    assert torch.equal(mask_padding_ids(torch.ones(2, 50257)), torch.ones(2, 50257))


def test_logits_are_processed_in_float32():
    """A bf16 model's logits are upcast first: divided by the temperature in bf16 (8 bits of
    mantissa) they would round, and top-p would sum rounded probabilities."""
    low = (3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))).bfloat16()
    for settings in (SamplingSettings(temperature=0.7, top_p=0.9), SamplingSettings(temperature=0)):
        processed = process_logits(low, settings)
        assert processed.dtype == torch.float32
        assert torch.equal(processed, process_logits(low.float(), settings))


def test_same_seed_same_output_other_seed_differs(sampling_pair):
    tokens = torch.tensor([[464, 3290], [40, 1101]])
    kw = dict(temperature=1.0, top_k=100, seed=123)
    a = generate(sampling_pair.model, tokens, 25, **kw)
    torch.manual_seed(999)  # the global RNG plays no part when a seed is given
    assert torch.equal(a, generate(sampling_pair.model, tokens, 25, **kw))
    assert not torch.equal(a, generate(sampling_pair.model, tokens, 25, **{**kw, "seed": 124}))


# --- text helpers and streaming ---------------------------------------------------------------


def test_stream_yields_what_generate_returns(sampling_pair):
    tokens = torch.tensor([[464, 3290, 318]])
    steps = list(stream(sampling_pair.model, tokens, 12, temperature=0.9, seed=5))
    assert len(steps) == 12 and all(s.shape == (1,) for s in steps)
    assert torch.equal(
        torch.stack(steps, dim=1), generate(sampling_pair.model, tokens, 12, temperature=0.9, seed=5)[:, 3:]
    )


def test_stream_text_pieces_join_to_generate_text(sampling_pair):
    tok = get_tokenizer()
    text = generate_text(sampling_pair.model, tok, "Hello world", 20, temperature=1.0, seed=3)
    pieces = list(stream_text(sampling_pair.model, tok, "Hello world", 20, temperature=1.0, seed=3))
    assert len(pieces) > 1
    assert text == "Hello world" + "".join(pieces)


def favour_token(model: Transformer, token: int, at: Callable[[int], bool]) -> list:
    """Make the unembedding of `model` (a copy: the hook stays) all but pick `token` at each of its
    forward calls n (counted from 1) where at(n): the prefill gives new token 1, decoding step k
    token k + 1. Returns the list of calls so far, to clear before another run."""
    calls = []

    def favour(module, args, logits):
        calls.append(1)
        if at(len(calls)):
            logits[..., token] += 1e4
        return logits

    model.unembed.register_forward_hook(favour)
    return calls


def test_text_generation_ends_before_the_first_endoftext(sampling_pair):
    """The unembedding is made to favour <|endoftext|> from the 4th new token on: generate_text and
    stream_text then give the first 3 tokens' text only, and with stop_at_eos=False the literal text."""
    model, tok = copy.deepcopy(sampling_pair.model), get_tokenizer()
    calls = favour_token(model, EOT_ID, at=lambda n: n >= 4)

    def run(fn, **kwargs):
        calls.clear()
        return fn(model, tok, "Hello world", 8, temperature=0, **kwargs)

    tokens = generate(model, to_tokens("Hello world"), 8, temperature=0, stop_at_eos=False)[0, 2:].tolist()
    assert tokens[3:] == [EOT_ID] * 5 and EOT_ID not in tokens[:3]
    text = "Hello world" + tok.decode(tokens[:3])
    assert run(generate_text) == text
    assert "Hello world" + "".join(run(stream_text)) == text
    assert run(generate_text, stop_at_eos=False) == text + "<|endoftext|>" * 5
    assert "Hello world" + "".join(run(stream_text, stop_at_eos=False)) == text + "<|endoftext|>" * 5


def test_text_generation_stops_at_a_given_eos_token_id(sampling_pair):
    """Not only at <|endoftext|>: with eos_token_id set to the 4th token greedy decoding picks, the
    text is the first 3 tokens' (not theirs followed by that token repeated as padding)."""
    model, tok = sampling_pair.model, get_tokenizer()
    tokens = generate(model, to_tokens("Hello world"), 8, temperature=0)[0, 2:].tolist()
    eos = tokens[3]
    assert eos not in tokens[:3] and eos != EOT_ID
    text = "Hello world" + tok.decode(tokens[:3])
    assert generate_text(model, tok, "Hello world", 8, temperature=0, eos_token_id=eos) == text
    assert "Hello world" + "".join(stream_text(model, tok, "Hello world", 8, temperature=0, eos_token_id=eos)) == text


def test_stream_text_flushes_an_unfinished_character_at_the_end(sampling_pair):
    """The last token is made to be a lone UTF-8 lead byte (0xE2, as in the first byte of "’"): the
    held-back byte is given out as U+FFFD at the end, as generate_text's decoding gives it."""
    model, tok = copy.deepcopy(sampling_pair.model), get_tokenizer()
    calls = favour_token(model, tok.encode_single_token(b"\xe2"), at=lambda n: n == 5)
    pieces = list(stream_text(model, tok, "Hello world", 5, temperature=0))
    calls.clear()
    text = generate_text(model, tok, "Hello world", 5, temperature=0)
    assert text.endswith("\ufffd")
    assert "Hello world" + "".join(pieces) == text


def test_a_prompt_of_endoftext_is_the_special_token(sampling_pair):
    """As the docstring of _encode says, "<|endoftext|>" is the way to ask for an unconditional
    sample: it is encoded as token 50256, not as the 6 tokens of its spelling."""
    model, tok = sampling_pair.model, get_tokenizer()
    generated = generate(model, torch.tensor([[EOT_ID]]), 6, temperature=0)[0, 1:].tolist()
    assert EOT_ID not in generated
    expected = "<|endoftext|>" + tok.decode(generated)
    assert generate_text(model, tok, "<|endoftext|>", 6, temperature=0) == expected
    assert "<|endoftext|>" + "".join(stream_text(model, tok, "<|endoftext|>", 6, temperature=0)) == expected


@pytest.mark.parametrize("tokenizer", [None, "gpt2", "hf"], ids=["None", "str", "hf"])
def test_the_text_functions_name_a_tokenizer_that_is_not_tiktokens(sampling_pair, tokenizer, without_shape_checks):
    """Before: None and "gpt2" failed inside as "'NoneType' object has no attribute 'encode'" and
    "'allowed_special' is an invalid keyword argument"; Hugging Face's tokenizer passed generate_text
    and failed stream_text halfway, at its first token (it has no decode_single_token_bytes)."""
    tokenizer = hf_tokenizer() if tokenizer == "hf" else tokenizer
    message = r"^tokenizer must be the tiktoken encoding gpt2_small.get_tokenizer\(\) returns, got "
    with pytest.raises(TypeError, match=message):
        generate_text(sampling_pair.model, tokenizer, "Hi", 2)
    with pytest.raises(TypeError, match=message):
        next(stream_text(sampling_pair.model, tokenizer, "Hi", 2))


def test_the_text_functions_given_the_prompt_for_the_tokenizer_say_so(sampling_pair, without_shape_checks):
    """As TransformerLens's model.generate("text") would suggest. Before, generate_text(model, "Hello", 5)
    blamed the 5: "prompt must be a str or a sequence of str, got int"."""
    for caller, call in (("generate_text", generate_text), ("stream_text", stream_text)):
        expected = (
            "tokenizer must be the tiktoken encoding gpt2_small.get_tokenizer() returns, got str "
            f"({caller} takes the model, the tokenizer, then the prompt)"
        )
        with pytest.raises(TypeError) as error:
            next(iter(call(sampling_pair.model, "Hello", 5)))
        assert str(error.value) == expected


def test_generate_text_batches_prompts_of_different_lengths(sampling_pair):
    tok = get_tokenizer()
    prompts = ["The cat sat on the", "Hi"]
    batched = generate_text(sampling_pair.model, tok, prompts, 10, temperature=0)
    assert batched == [generate_text(sampling_pair.model, tok, p, 10, temperature=0) for p in prompts]
    assert all(b.startswith(p) and len(b) > len(p) for b, p in zip(batched, prompts, strict=True))


def test_max_new_tokens_zero_returns_the_prompt(sampling_pair):
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(sampling_pair.model, tokens, 0), tokens)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), r"temperature must be .* got -0\.1"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
        (dict(temperature=True), r"temperature must be .* got True"),
        (dict(top_k=0), r"top_k must be an int in \[1, d_vocab=50257\].*got 0"),
        (dict(top_k=50258), r"got 50258"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\].*got 0\.0"),
        (dict(top_p=1.5), r"got 1\.5"),
        (dict(top_p=True), r"top_p must be in \(0, 1\].*got True"),
        (dict(top_k=True), r"top_k must be an int.*got True"),
        (dict(freq_penalty=math.inf), "freq_penalty"),
        (dict(presence_penalty=-math.inf), r"presence_penalty must be a finite number, got -inf"),
    ],
)
def test_invalid_sampling_settings_raise(sampling_pair, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(sampling_pair.model, torch.tensor([[1, 2]]), 5, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        # before: accepted, and process_logits divided by -1, which made the least likely token the greedy one
        (dict(temperature=-1.0), r"^temperature must be a finite number >= 0 \(0 = greedy\), got -1\.0$"),
        (dict(top_p=2.0), r"^top_p must be in \(0, 1\] or None, got 2\.0$"),  # before: sampled unfiltered
        (dict(top_k=0), r"^top_k must be an int >= 1 or None, got 0$"),  # before: topk's IndexError
        (dict(top_k=2.0), r"^top_k must be an int >= 1 or None, got 2\.0$"),
        (dict(freq_penalty=math.nan), r"^freq_penalty must be a finite number, got nan$"),
    ],
)
def test_sampling_settings_are_checked_when_made(kwargs, match, without_shape_checks):
    """process_logits and sample_next_token are public and take the settings as given; generate was
    the only caller that checked them."""
    with pytest.raises(ValueError, match=match):
        SamplingSettings(**kwargs)
    settings = SamplingSettings(temperature=0.5, top_k=10**9, top_p=1)  # no vocabulary yet to bound top_k by
    logits = torch.tensor([[0.0, 1.0, 3.0]])
    torch.testing.assert_close(process_logits(logits, settings), logits / 0.5, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^top_k must be an int in \[1, d_vocab=3\] or None, got 1000000000$"):
        settings.check(3)


def test_the_ends_of_each_allowed_range_are_accepted(sampling_pair):
    """top_k = d_vocab and top_p = 1 keep every token, so they draw what no filter draws; a prompt
    plus max_new_tokens of exactly n_ctx fits."""
    model, tokens = sampling_pair.model, torch.tensor([[464, 3290]])
    plain = generate(model, tokens, 8, seed=1)
    assert torch.equal(generate(model, tokens, 8, seed=1, top_k=model.cfg.d_vocab), plain)
    assert torch.equal(generate(model, tokens, 8, seed=1, top_p=1), plain)
    assert torch.equal(generate(model, tokens, 8, seed=1, top_p=1.0, temperature=1), plain)
    prompt = torch.ones(1, 100, dtype=torch.long)
    full = generate(model, prompt, model.cfg.n_ctx - 100, temperature=0, stop_at_eos=False)
    assert full.shape == (1, model.cfg.n_ctx)


def test_flags_that_are_no_bools_are_refused_not_taken_as_true(sampling_pair, without_shape_checks):
    """Before: "no" (a str from a config file, say) was truthy, so stop_at_eos="no" stopped at eos and
    use_kv_cache="no" used the cache."""
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    for flag in ("stop_at_eos", "use_kv_cache", "compile"):
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'$"):
            generate(model, tokens, 3, **{flag: "no"})
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 1$"):
            generate(model, tokens, 3, **{flag: 1})
    with pytest.raises(TypeError, match=r"^cuda_graph must be True, False or None, got 'no'$"):
        generate(model, tokens, 3, cuda_graph="no")
    for flag in ("use_kv_cache", "compile"):
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'$"):
            beam_search(model, tokens, 2, 3, **{flag: "no"})
    with pytest.raises(
        ValueError, match=r"^length_penalty must be a finite number, got 'a'$"
    ):  # was "must be real number"
        beam_search(model, tokens, 2, 3, length_penalty="a")
    for batch, max_pos in ((1.5, 4), (1, 4.0), (True, 4)):  # was torch's "zeros(): argument 'size' ..."
        with pytest.raises(TypeError, match=r"^KVCache batch and max_pos must be ints, got "):
            KVCache.for_model(model, batch, max_pos)
    with pytest.raises(
        TypeError, match=r"^KVCache cfg must be a TransformerConfig \(or use KVCache.for_model\), got Transformer$"
    ):
        KVCache(model, 1, 4)  # was "'Transformer' object has no attribute 'n_ctx'"


def test_a_seed_that_is_no_int_is_refused_before_any_step(sampling_pair, without_shape_checks):
    """Before: torch's "manual_seed expected a long, but got str", from inside the stream. A bool is
    refused too: seed=True would silently be seed 1."""
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    for seed in ("a", 1.5, True, torch.tensor(3)):
        with pytest.raises(TypeError, match=rf"^seed must be an int or None, got {re.escape(repr(seed))}$"):
            generate(model, tokens, 3, seed=seed)
    assert torch.equal(generate(model, tokens, 3, seed=np.int64(7)), generate(model, tokens, 3, seed=7))


def test_a_seed_outside_torchs_range_is_named(sampling_pair):
    """torch's generators take [-2**63, 2**64) and said only "Overflow when unpacking long long"
    past either end; both ends themselves still sample (a negative seed is taken modulo 2**64)."""
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"^seed {seed} is outside the range torch's generators take, "):
            generate(model, tokens, 3, temperature=1.0, seed=seed)
    same = generate(model, tokens, 5, temperature=1.0, seed=-1)
    assert torch.equal(same, generate(model, tokens, 5, temperature=1.0, seed=2**64 - 1))
    assert generate(model, tokens, 5, temperature=1.0, seed=-(2**63)).shape == (1, 7)


def test_a_negative_eos_id_is_refused(sampling_pair, small_vocab_pair, without_shape_checks):
    """Before: accepted, and no row could ever stop at it. (Without jaxtyping, as in a user's code,
    our check also answers for the float.)"""
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    for eos, shown in ((-1, "-1"), (2.0, "2.0"), (True, "True")):
        message = rf"^eos_token_id must be a token id, an int >= 0, got {shown}$"
        with pytest.raises(ValueError, match=message):
            generate(model, tokens, 3, eos_token_id=eos)
        with pytest.raises(ValueError, match=message):
            beam_search(model, tokens, 2, 3, eos_token_id=eos)
    # An id past the vocabulary, as the default 50256 is for this 100-token model, never stops a row.
    small = small_vocab_pair.model
    assert small.cfg.d_vocab == 100 and generate(small, tokens, 3, temperature=0).shape == (1, 5)


def test_pad_prompts_names_text_given_for_token_ids(without_shape_checks):
    """Before, in a user's code (no jaxtyping): torch's "too many dimensions 'str'"."""
    with pytest.raises(TypeError, match=r"^pad_prompts takes lists of token ids, got the str 'b'; encode text first"):
        pad_prompts([[1, 2], "b"])
    with pytest.raises(TypeError, match=r"^pad_prompts takes lists of token ids, got the str 'hi'; encode"):
        pad_prompts("hi")  # before: "got the str 'h'", its first character


def test_pad_prompts_refuses_ids_that_are_not_ints(without_shape_checks):
    """Before: [[1.5, 2]] gave the tokens [[1, 2]], and [[True]] the token 1."""
    for prompt, dtype in [([1.5, 2], "torch.float32"), ([True], "torch.bool"), (torch.tensor([3.0]), "torch.float32")]:
        with pytest.raises(TypeError, match=rf"^prompt 1 must be a flat sequence of token ids \(ints\), got {dtype}"):
            pad_prompts([[7, 8], prompt])
    with pytest.raises(TypeError, match=r"prompt 0 .* of shape \(1, 2\)"):
        pad_prompts([[[1, 2]]])
    tokens, mask = pad_prompts([torch.tensor([5, 6, 7]), np.array([8], dtype=np.uint16), (9, 10)])
    assert tokens.tolist() == [[5, 6, 7], [50256, 50256, 8], [50256, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]] and tokens.dtype == mask.dtype == torch.long


def test_invalid_requests_raise(sampling_pair):
    model = sampling_pair.model
    for max_new_tokens in (-1, True):
        with pytest.raises(ValueError, match=rf"^max_new_tokens must be an int >= 0, got {max_new_tokens}$"):
            generate(model, torch.tensor([[1, 2]]), max_new_tokens)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(model, get_tokenizer(), "", 5)
    with pytest.raises(ValueError, match=r"prompt of 100 tokens \+ max_new_tokens=29 = 129 exceeds n_ctx=128"):
        generate(model, torch.ones(1, 100, dtype=torch.long), 29)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, torch.tensor([[1, 2, 3]]), 5, attention_mask=torch.tensor([[1, 1, 0]]))
    for num_beams in (0, True):
        with pytest.raises(ValueError, match=rf"^num_beams must be an int >= 1, got {num_beams}$"):
            beam_search(model, torch.tensor([[1, 2]]), num_beams, 5)
    for size in (-1, True):
        with pytest.raises(ValueError, match=rf"^no_repeat_ngram_size must be an int >= 0, got {size}$"):
            beam_search(model, torch.tensor([[1, 2]]), 2, 5, no_repeat_ngram_size=size)
    with pytest.raises(ValueError, match=r"^length_penalty must be a finite number, got inf$"):
        beam_search(model, torch.tensor([[1, 2]]), 2, 5, length_penalty=math.inf)
    for max_new_tokens in (0, -1, True):  # generate takes 0; beam search has nothing to score then
        with pytest.raises(ValueError, match=rf"^max_new_tokens must be an int >= 1, got {max_new_tokens}$"):
            beam_search(model, torch.tensor([[1, 2]]), 2, max_new_tokens)


def test_wrongly_typed_arguments_get_our_type_errors(sampling_pair, without_shape_checks):
    """What a user's code, run without jaxtyping's checks, sees (before: AttributeError from inside generate)."""
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor of token ids, got list"):
        generate(model, [[1, 2, 3]], 3)
    with pytest.raises(TypeError, match="model must be a gpt2_small.Transformer, got NoneType"):
        generate(None, tokens, 3)
    with pytest.raises(TypeError, match="prompt must be a str or a sequence of str, got int"):
        generate_text(model, get_tokenizer(), 5, 3)
    with pytest.raises(TypeError, match=r"^prompt 1 must be a str, got int$"):  # the one in the list named
        generate_text(model, get_tokenizer(), ["a", 5], 3)
    with pytest.raises(ValueError, match=r"^prompt 2 of the list is empty; use '<\|endoftext\|>' for an unconditional"):
        generate_text(model, get_tokenizer(), ["a", "b", ""], 3)
    with pytest.raises(TypeError, match=r"^prompt must be a str, got bytes$"):
        next(stream_text(model, get_tokenizer(), b"a", 3))
    with pytest.raises(TypeError, match=r"^prompt must be a str or a sequence of str, got bytes$"):
        generate_text(model, get_tokenizer(), b"a", 3)  # before: "prompt 0 must be a str, got int"
    assert generate(model, tokens, 3, temperature=0).shape == (1, 5)  # the same calls, well typed


@pytest.mark.parametrize("option", sorted(OTHER_SAMPLING_OPTIONS))
def test_other_libraries_generate_options_are_refused_naming_what_to_write_here(sampling_pair, option):
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    message = re.escape(OTHER_SAMPLING_OPTIONS[option])
    with pytest.raises(TypeError, match=rf"^generate takes no {option}: {message}$"):
        generate(model, tokens, 3, **{option: 2})
    with pytest.raises(TypeError, match=rf"^generate takes no {option}: "):
        generate_text(model, get_tokenizer(), "a", 3, **{option: 2})
    with pytest.raises(TypeError, match=rf"^stream takes no {option}: {message}$"):
        next(stream(model, tokens, 3, **{option: 2}))
    # each hint names keywords generate takes, or beam_search
    for name in re.findall(r"(\w+)=", OTHER_SAMPLING_OPTIONS[option].replace(f"{option}=", "")):
        assert name in inspect.signature(generate).parameters, name


def test_unknown_generate_keywords_get_pythons_message(sampling_pair):
    model, tokens = sampling_pair.model, torch.tensor([[1, 2]])
    with pytest.raises(TypeError, match=r"^generate\(\) got an unexpected keyword argument 'temprature'$"):
        generate(model, tokens, 3, temprature=0)
    with pytest.raises(TypeError, match=r"^stream\(\) got an unexpected keyword argument 'temprature'$"):
        next(stream(model, tokens, 3, temprature=0))


def test_pad_prompts_names_an_empty_list_and_an_empty_prompt_apart():
    with pytest.raises(ValueError, match="no prompts given"):
        pad_prompts([])
    with pytest.raises(ValueError, match=r"^prompt 1 of 3 is empty; every prompt needs at least one token$"):
        pad_prompts([[1, 2], [], [3]])  # which one, in a batch of many: before, "empty prompt given"


def test_padding_outside_a_small_vocabulary_is_named_as_the_padding(small_vocab_pair):
    """pad_prompts pads with <|endoftext|> (50256) by default, which a small vocabulary lacks.
    Before: "token id 50256 is outside [0, d_vocab=...)", with nothing pointing at the padding."""
    model = small_vocab_pair.model
    d_vocab = model.cfg.d_vocab
    tokens, mask = pad_prompts([[1, 2, 3], [4]])
    padding = rf"^token id 50256 is outside \[0, d_vocab={d_vocab}\); it is the padding's \(attention_mask 0\), "
    for call in (
        lambda: generate(model, tokens, 3, attention_mask=mask, temperature=0),
        lambda: beam_search(model, tokens, 2, 3, attention_mask=mask),
        lambda: model(tokens, attention_mask=mask),
    ):
        with pytest.raises(ValueError, match=padding + r"which is embedded all the same: pad with an id the model has"):
            call()
    real = tokens.clone()
    real[1, 0], real[0, 0] = 0, 50256  # now a real token is out of range: the plain message
    with pytest.raises(ValueError, match=rf"^token id 50256 is outside \[0, d_vocab={d_vocab}\)$"):
        model(real, attention_mask=mask)
    generate(model, pad_prompts([[1, 2, 3], [4]], pad_id=0)[0], 3, attention_mask=mask, temperature=0)  # as it says


def test_pad_prompts_names_a_pad_id_that_is_no_token_id(without_shape_checks):
    """Before: pad_id=1.5 or True padded with the token 1, and -1 was put in the tokens."""
    for pad_id in (1.5, True, -1, "0"):
        with pytest.raises(
            ValueError, match=rf"^pad_id must be a token id, an int >= 0, got {re.escape(repr(pad_id))}$"
        ):
            pad_prompts([[1, 2], [3]], pad_id=pad_id)
    assert pad_prompts([[1, 2], [3]], pad_id=np.int64(7))[0].tolist() == [[1, 2], [7, 3]]


@pytest.mark.parametrize("value", [2, -1])
def test_a_mask_value_other_than_0_or_1_is_refused(sampling_pair, value):
    # forward reads any nonzero value as a token, but generate's penalties would count a 2 twice.
    model = sampling_pair.model
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = model(tokens, attention_mask=mask)
    for same in (mask.bool(), mask.int()):
        torch.testing.assert_close(model(tokens, attention_mask=same), expected, rtol=0, atol=0)
    mask[1, 0] = value
    message = rf"attention_mask values must be 0 \(padding\) or 1 \(token\), found {value}"
    with pytest.raises(ValueError, match=message):
        model(tokens, attention_mask=mask)
    with pytest.raises(ValueError, match=message):
        generate(model, tokens, 2, attention_mask=mask, freq_penalty=1.0)


def test_forward_names_a_mask_that_is_no_tensor(sampling_pair, without_shape_checks):
    """As a user's code without jaxtyping's checks passes it: a list, where a tensor is needed."""
    with pytest.raises(TypeError, match="^attention_mask must be a torch.Tensor, got list$"):
        sampling_pair.model(torch.tensor([[1, 2, 3]]), attention_mask=[[1, 1, 1]])


def test_forward_rejects_bad_masks_and_caches(sampling_pair):
    model = sampling_pair.model
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\); it must match tokens, \(1, 3\)"):
        model(tokens, attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be bool or integer"):
        model(tokens, attention_mask=torch.ones(1, 3))
    cache = KVCache.for_model(model, batch=1, max_pos=4)
    model(tokens, kv_cache=cache)
    with pytest.raises(ValueError, match=r"3 cached \+ 2 new positions exceed the kv_cache's max_pos=4"):
        model(torch.tensor([[4, 5]]), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache holds 1 sequences, but tokens has batch size 2"):
        model(torch.tensor([[4], [5]]), kv_cache=cache)
    # A larger cache too: one sequence's keys would broadcast into both of its rows.
    with pytest.raises(ValueError, match="kv_cache holds 2 sequences, but tokens has batch size 1"):
        model(tokens, kv_cache=KVCache.for_model(model, batch=2, max_pos=4))
    with pytest.raises(ValueError, match=r"KVCache max_pos=129 must be in \[1, n_ctx=128\]"):
        KVCache.for_model(model, batch=1, max_pos=129)
    with pytest.raises(ValueError, match=r"KVCache max_pos=0 must be in \[1, n_ctx=128\]"):
        KVCache.for_model(model, batch=1, max_pos=0)
    with pytest.raises(ValueError, match="KVCache batch=0 must be >= 1"):
        KVCache.for_model(model, batch=0, max_pos=4)
    for n_layers, n_heads, d_head in ((1, 4, 16), (2, 2, 16), (2, 4, 8)):  # this model's is (2, 4, 16)
        cfg = TransformerConfig(
            d_model=n_heads * d_head, n_layers=n_layers, n_heads=n_heads, d_head=d_head, d_mlp=64, n_ctx=16
        )
        with pytest.raises(ValueError, match="another shape"):
            model(tokens, kv_cache=KVCache.for_model(Transformer(cfg), batch=1, max_pos=8))
