"""What needs a CUDA device: the CUDA-graph decoding path (plain and compiled) against the eager one,
and the trainer's GPU path (bf16 autocast, fused AdamW, torch.compile).

Skipped without a GPU (CI has none); run on one with `pytest tests/test_cuda.py`.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_small import KVCache, beam_search, generate, pad_prompts
from gpt2_small.data import TokenData
from gpt2_small.training import PRESETS, TrainConfig, Trainer, embeddings_tied, lm_loss, unembed_lm_loss
from solution import TransformerConfig, Unembedding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model(sampling_pair):
    return copy.deepcopy(sampling_pair.model).cuda()


def test_cuda_graph_greedy_equals_eager_and_hf_token_for_token(cuda_model, sampling_pair):
    tokens, mask = pad_prompts([[3, 14, 15, 92, 65, 35], [89, 79], [1, 2, 3]], device="cuda")
    graphed = generate(cuda_model, tokens, 40, temperature=0, attention_mask=mask, cuda_graph=True)
    eager = generate(cuda_model, tokens, 40, temperature=0, attention_mask=mask, cuda_graph=False)
    assert torch.equal(graphed, eager)
    eos = sampling_pair.hf.config.eos_token_id
    hf = sampling_pair.hf.generate(
        tokens.cpu(), attention_mask=mask.cpu(), do_sample=False, max_new_tokens=40, pad_token_id=eos,
        eos_token_id=eos,
    )  # fmt: skip
    assert torch.equal(graphed.cpu(), hf)


def test_cuda_graph_sampling_with_a_seed_equals_eager(cuda_model):
    tokens = torch.randint(0, 50257, (4, 7), generator=torch.Generator().manual_seed(3)).cuda()
    kwargs = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "freq_penalty": 0.5, "seed": 7}
    graphed = generate(cuda_model, tokens, 30, cuda_graph=True, **kwargs)
    assert torch.equal(graphed, generate(cuda_model, tokens, 30, cuda_graph=False, **kwargs))
    assert not torch.equal(graphed, generate(cuda_model, tokens, 30, cuda_graph=True, **{**kwargs, "seed": 8}))


@pytest.mark.parametrize("padded", [False, True], ids=["equal-length", "left-padded"])
def test_cuda_graph_beam_search_equals_eager(cuda_model, padded):
    tokens = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(4)).cuda()
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], device="cuda") if padded else None
    kwargs = {"num_beams": 4, "max_new_tokens": 12, "attention_mask": mask}
    graphed = beam_search(cuda_model, tokens, cuda_graph=True, **kwargs)
    eager = beam_search(cuda_model, tokens, cuda_graph=False, **kwargs)
    assert torch.equal(graphed.tokens, eager.tokens)
    torch.testing.assert_close(graphed.scores, eager.scores)


def test_cuda_graph_refuses_hooks_and_no_cache_and_the_default_runs_hooks_eagerly(cuda_model):
    tokens = torch.tensor([[10, 20, 30]], device="cuda")
    calls = []
    with cuda_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append(x.shape[1]))]):
        with pytest.raises(ValueError, match="hooks would not run"):
            generate(cuda_model, tokens, 5, temperature=0, cuda_graph=True)
        generate(cuda_model, tokens, 5, temperature=0)  # cuda_graph=None: eager, since a hook is attached
    assert calls == [3, 1, 1, 1, 1]  # the prompt, then every step's one position
    with pytest.raises(ValueError, match=r"cuda_graph=True needs use_kv_cache=True"):
        generate(cuda_model, tokens, 5, temperature=0, cuda_graph=True, use_kv_cache=False)


def test_bfloat16_cuda_graph_greedy_equals_bfloat16_eager(cuda_model):
    model = copy.deepcopy(cuda_model).bfloat16()
    tokens = torch.randint(0, 50257, (8, 16), generator=torch.Generator().manual_seed(5)).cuda()
    graphed = generate(model, tokens, 64, temperature=0, stop_at_eos=False, cuda_graph=True)
    eager = generate(model, tokens, 64, temperature=0, stop_at_eos=False, cuda_graph=False)
    # Same kernels on the same static cache shapes: bitwise the same logits, so the same tokens.
    assert torch.equal(graphed, eager)


def test_graphed_generation_runs_under_bf16_autocast(cuda_model):
    """The float32 model under bf16 autocast: the graph's static cache takes the bf16 keys and
    values (before, its index_copy_ refused them at the first step), and its logits are the
    dynamic cache's to bf16 rounding (the attention spans all slots there, the filled ones here)."""
    tokens, mask = pad_prompts([[3, 14, 15, 92, 65, 35], [89, 79]], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = generate(cuda_model, tokens, 32, temperature=0, attention_mask=mask, stop_at_eos=False)
        logits = {}
        for static in (False, True):
            cache = KVCache.for_model(cuda_model, batch=2, max_pos=tokens.shape[1] + 1, static=static)
            with torch.no_grad():
                cuda_model(tokens, attention_mask=mask, kv_cache=cache)
                logits[static] = cuda_model(graphed[:, tokens.shape[1], None], kv_cache=cache)[:, -1]
    assert graphed.shape == (2, tokens.shape[1] + 32) and bool((graphed < 50257).all())
    torch.testing.assert_close(logits[True], logits[False], rtol=2e-2, atol=2e-2)


def test_compiled_cuda_graph_decoding_equals_eager(cuda_model, without_shape_checks):
    """compile=True with the graph: the graph replays inductor's fused kernels. float32, so the
    fused arithmetic stays within rounding of the eager step and greedy picks the same tokens."""
    tokens, mask = pad_prompts([[3, 14, 15, 92, 65, 35], [89, 79], [1, 2, 3]], device="cuda")
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = generate(cuda_model, tokens, 40, temperature=0, attention_mask=mask, cuda_graph=True, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it did compile
    assert torch.equal(compiled, generate(cuda_model, tokens, 40, temperature=0, attention_mask=mask, cuda_graph=False))
    beams = beam_search(cuda_model, tokens[:1], num_beams=3, max_new_tokens=12, cuda_graph=True, compile=True)
    eager = beam_search(cuda_model, tokens[:1], num_beams=3, max_new_tokens=12, cuda_graph=False)
    assert torch.equal(beams.tokens, eager.tokens)
    torch.testing.assert_close(beams.scores, eager.scores)


def test_a_second_cuda_graph_generation_replays_the_kept_graph_with_edited_weights(cuda_model):
    """The graph captured by one generation is replayed by the next of the same shape (no new
    capture), and it reads the parameters themselves: an in-place edit shows in its tokens."""
    from gpt2_small.sampling import _KEPT

    model = copy.deepcopy(cuda_model)
    tokens, mask = pad_prompts([[3, 14, 15, 92, 65, 35], [89, 79]], device="cuda")
    kwargs = {"temperature": 0, "attention_mask": mask, "stop_at_eos": False}
    first = generate(model, tokens, 30, cuda_graph=True, **kwargs)
    graph = _KEPT[model].step.graph
    assert graph is not None
    assert torch.equal(generate(model, tokens, 30, cuda_graph=True, **kwargs), first)
    assert _KEPT[model].step.graph is graph
    with torch.no_grad():
        model.blocks[0].mlp.W_in.data.mul_(-2.0)
        model.blocks[1].attn.W_Q.data.mul_(3.0)
    edited = generate(model, tokens, 30, cuda_graph=True, **kwargs)
    assert _KEPT[model].step.graph is graph
    assert torch.equal(edited, generate(model, tokens, 30, cuda_graph=False, **kwargs))
    assert not torch.equal(edited, first)
    bf16 = model.bfloat16()  # new parameter storage: the kept graph must not be replayed
    graphed = generate(bf16, tokens, 30, cuda_graph=True, **kwargs)
    assert _KEPT[bf16].step.graph is not graph
    assert torch.equal(graphed, generate(bf16, tokens, 30, cuda_graph=False, **kwargs))


def test_fused_unembed_loss_under_cuda_bf16_autocast_equals_lm_loss():
    """The trainer's default loss on the GPU path: bf16 autocast, vocabulary 50304, several chunks."""
    torch.manual_seed(0)
    unembed = Unembedding(TransformerConfig(d_vocab=50304)).cuda()
    x = torch.randn(4, 512, 768, device="cuda", requires_grad=True)
    targets = torch.randint(0, 50257, (4, 512), device="cuda")
    results = []
    for loss_fn in (lambda: lm_loss(unembed(x), targets), lambda: unembed_lm_loss(x, unembed, targets, chunk_rows=700)):
        x.grad = unembed.W_U.grad = unembed.b_U.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        results.append((loss.detach(), x.grad, unembed.W_U.grad, unembed.b_U.grad))
    (loss, *grads), (expected, *expected_grads) = results[1], results[0]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    # Gradients: bf16 products in both, summed in different orders; compared as a whole (relative
    # norm of the difference), since the W_U and b_U entries are ~1e-5 each.
    for name, grad, want in zip(["x", "W_U", "b_U"], grads, expected_grads, strict=True):
        assert float((grad - want).norm() / want.norm()) < 1e-2, name


MICRO = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, n_ctx=16)


def train_and_resume(
    out: Path, device: str, compile: bool, tie_embeddings: bool = False
) -> tuple[list[dict], list[dict], Trainer]:
    """40 steps of a micro model on a repeating 40-token cycle (the next token follows from the
    current one), uninterrupted and stopped at step 20 then resumed, on the "micro" preset (MICRO,
    registered by the caller). Returns both runs' rows and the uninterrupted run's trainer."""
    cycle = np.random.default_rng(0).permutation(50257)[:40].astype(np.uint16)
    data = TokenData(np.tile(cycle, 200), np.tile(cycle, 20), "40-token cycle")

    def config(run: str) -> TrainConfig:
        return TrainConfig(
            preset="micro", batch_size=8, max_steps=40, warmup_steps=5, lr=1e-2, eval_interval=20, eval_batches=2,
            sample_interval=0, sample_tokens=4, device=device, compile=compile, out_dir=str(out / run), seed=0,
            tie_embeddings=tie_embeddings,
        )  # fmt: skip

    whole = Trainer(config("whole"), data=data)
    rows = whole.run()
    Trainer(config("split"), data=data).run(stop_at=20)
    resumed = Trainer(config("split"), data=data, resume=True)
    assert resumed.step == 20
    return rows, resumed.run(), whole


@pytest.mark.parametrize(
    "compile, tie_embeddings", [(False, False), (True, False), (True, True)], ids=["eager", "compiled", "compiled-tied"]
)
def test_the_trainer_learns_under_bf16_autocast_and_resumes_on_cuda(
    tmp_path, monkeypatch, compile, tie_embeddings, without_shape_checks
):
    monkeypatch.setitem(PRESETS, "micro", MICRO)
    rows, resumed, trainer = train_and_resume(tmp_path, "cuda", compile, tie_embeddings)
    assert embeddings_tied(trainer.model) == tie_embeddings
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    assert trainer.model.W_E.dtype == torch.float32  # autocast: the weights and optimizer stay float32
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert loss[40] < 0.5 * loss[1], loss
    # CUDA kernels need not add in the same order twice (the embedding's backward uses atomics),
    # so the resumed run is close to the uninterrupted one rather than bit-identical as on a CPU.
    resumed_loss = {r["step"]: r["loss"] for r in resumed if "loss" in r}
    assert sorted(resumed_loss) == list(range(1, 41))
    for step in range(21, 41):
        assert resumed_loss[step] == pytest.approx(loss[step], rel=2e-2), step
