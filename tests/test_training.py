"""The trainer: schedule, decay groups, learning, exact resume, Ctrl-C, DDP."""

import atexit
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gpt2_small
from gpt2_small import training
from gpt2_small.data import TokenData
from gpt2_small.training import (
    PRESETS,
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingTerminated,
    latest_checkpoint,
    lm_loss,
    lr_at,
    param_groups,
    pick_device,
    plot_loss_curve,
    sample_text,
    unembed_lm_loss,
)
from solution import IGNORE_INDEX, Transformer, TransformerConfig, Unembedding

MICRO = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, n_ctx=16)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", MICRO)


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory) -> TokenData:
    """20k training and 4k validation tokens of the bundled corpus."""
    data = TokenData.load(cache_dir=tmp_path_factory.mktemp("token-cache"))
    return TokenData(np.array(data.train[:20_000]), np.array(data.val[:4_000]), "shakespeare-slice")


def micro_config(out_dir, **overrides) -> TrainConfig:
    base = dict(
        preset="micro", batch_size=4, max_steps=8, warmup_steps=2, lr=1e-2, min_lr=1e-3, eval_interval=4,
        eval_batches=2, sample_interval=0, sample_tokens=4, device="cpu", out_dir=str(out_dir), seed=0,
    )  # fmt: skip
    return TrainConfig(**(base | overrides))


def losses(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --- schedule and optimizer groups ------------------------------------------------------------


def test_lr_schedule_warmup_peak_and_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)  # first warmup step: lr / warmup_steps
    assert lr_at(4, cfg, 110) == pytest.approx(5e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert lr_at(60, cfg, 110) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)  # the floor at max_steps
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)
    values = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay


def test_learning_rates_default_by_preset_and_floor_to_a_tenth_of_a_given_lr():
    tiny, gpt2 = TrainConfig(), TrainConfig(preset="gpt2")
    assert (tiny.lr, tiny.min_lr) == (1.5e-3, 1.5e-4)  # exactly the values the README's sweep chose
    assert (gpt2.lr, gpt2.min_lr) == (6e-4, 6e-5)
    given = TrainConfig(preset="gpt2", lr=2e-4)  # the floor follows the given peak, never above it
    assert (given.lr, given.min_lr) == (2e-4, pytest.approx(2e-5))
    assert TrainConfig(lr=1e-4).min_lr == pytest.approx(1e-5)  # below the tiny preset's floor: no error
    assert TrainConfig(preset="gpt2", min_lr=1e-5).lr == 6e-4  # a given floor is kept under the preset's peak
    flat = TrainConfig(lr=1e-3, min_lr=1e-3, warmup_steps=2)  # a floor equal to the peak: a constant lr after warmup
    assert [lr_at(step, flat, 10) for step in (2, 5, 10)] == [1e-3, 1e-3, 1e-3]
    with pytest.raises(ValueError, match="preset 'micro' has no default learning rate"):
        TrainConfig(preset="micro")  # registered by the autouse fixture, with no entry in PRESET_LR


def test_gpt2_trains_gpt2s_own_form_and_tiny_transformerlenss_unless_told(tmp_path, shakespeare_slice):
    def form(**overrides):
        cfg = TrainConfig(**overrides)
        return cfg.tie_embeddings, cfg.unembed_bias

    assert form() == (False, True)  # tiny: W_U and b_U parameters of their own
    assert form(preset="gpt2") == (True, False)  # one tied matrix and no b_U, as GPT-2 was trained
    assert form(preset="gpt2", tie_embeddings=False) == (False, False)  # each setting overrides alone
    assert form(unembed_bias=False) == (False, False)
    assert form(preset="micro", lr=1e-3) == (False, True)  # a preset PRESET_UNEMBEDDING does not name
    # What a run trained with is what its checkpoint records, so resuming compares the same values.
    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=1)
    saved = json.loads((latest_checkpoint(tmp_path) / training.TRAIN_CONFIG).read_text())
    assert (saved["tie_embeddings"], saved["unembed_bias"]) == (False, True)


def test_the_unembedding_settings_must_be_booleans(without_shape_checks):
    with pytest.raises(TypeError, match=r"tie_embeddings must be True, False or None \(the preset's\), got 1"):
        TrainConfig(tie_embeddings=1)
    with pytest.raises(TypeError, match=r"unembed_bias must be True, False or None \(the preset's\), got 'no'"):
        TrainConfig(unembed_bias="no")  # truthy: it would have turned b_U on


@pytest.mark.parametrize("warmup_steps", [7, 8, 9])
def test_a_warmup_as_long_as_the_run_is_warned_about(warmup_steps, tmp_path, shakespeare_slice, caplog):
    """With warmup_steps >= max_steps the learning rate only rises: it ends below or at the peak and
    never decays. That is almost always a leftover default on a short run, so it is logged."""
    caplog.set_level("WARNING", logger="gpt2_small.training")
    Trainer(micro_config(tmp_path, warmup_steps=warmup_steps), data=shakespeare_slice)  # max_steps=8
    warned = [r.getMessage() for r in caplog.records if "warmup_steps" in r.getMessage()]
    if warmup_steps < 8:
        assert warned == []
    else:
        last = 1e-2 * 8 / warmup_steps  # lr * (step + 1) / warmup_steps at step 7
        assert warned == [
            f"warmup_steps={warmup_steps} is not below the run's 8 steps: the learning rate rises for the whole "
            f"run, to {last:.2e} at its last step (peak lr=1.00e-02), and the cosine decay never starts; "
            "lower --warmup-steps"
        ]


def test_a_stride_beyond_n_ctx_is_warned_about(tmp_path, shakespeare_slice, caplog):
    """Windows of n_ctx + 1 tokens every `stride` tokens: past n_ctx, stride - n_ctx tokens after
    each window are never a target. Allowed, as a thinned pass, but said; silent before."""
    caplog.set_level("WARNING", logger="gpt2_small.training")
    n_ctx = micro_config(tmp_path).model_config.n_ctx
    for stride in (n_ctx - 1, n_ctx, None):
        Trainer(micro_config(tmp_path, stride=stride, overwrite=True), data=shakespeare_slice)
    assert not [r for r in caplog.records if "stride" in r.getMessage()]
    Trainer(micro_config(tmp_path, stride=n_ctx + 3, overwrite=True), data=shakespeare_slice)
    assert [r.getMessage() for r in caplog.records if "stride" in r.getMessage()] == [
        f"stride={n_ctx + 3} exceeds n_ctx={n_ctx}: 3 of every {n_ctx + 3} training tokens are never a target "
        "(no window predicts them); a stride of at most n_ctx (or None, which tiles the stream) trains on all of them"
    ]


def test_weight_decay_groups_hold_exactly_the_weight_matrices():
    with torch.device("meta"):
        model = Transformer(MICRO)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    block = lambda i, names: [f"blocks.{i}.{n}" for n in names]  # noqa: E731
    expected_decay = ["embed.W_E", "pos_embed.W_pos"]
    expected_no_decay = []
    for i in range(MICRO.n_layers):
        expected_decay += block(i, ["attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out"])
        expected_no_decay += block(
            i,
            [
                "ln1.w",
                "ln1.b",
                "attn.b_Q",
                "attn.b_K",
                "attn.b_V",
                "attn.b_O",
                "ln2.w",
                "ln2.b",
                "mlp.b_in",
                "mlp.b_out",
            ],
        )
    expected_decay += ["unembed.W_U"]
    expected_no_decay += ["ln_final.w", "ln_final.b", "unembed.b_U"]
    assert sorted(decay["names"]) == sorted(expected_decay)
    assert sorted(no_decay["names"]) == sorted(expected_no_decay)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # A tied W_U is left to W_E's update; a name that is not a parameter is a mistake.
    tied_decay, _ = param_groups(model, 0.1, exclude={"unembed.W_U"})
    assert sorted(tied_decay["names"]) == sorted(set(expected_decay) - {"unembed.W_U"})
    with pytest.raises(ValueError, match=r"exclude names \['unembed.W'\], which are not parameters"):
        param_groups(model, 0.1, exclude={"unembed.W"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seed", "a", "seed must be an int, got 'a'"),  # before: taken, and refused by torch at the first step
        ("batch_size", 2.0, "batch_size must be an int, got 2.0"),
        ("max_steps", True, "max_steps must be an int, got True"),
        ("lr", "1e-3", "lr must be a number or None, got '1e-3'"),  # before: "'<' not supported between ..."
        ("val_fraction", None, "val_fraction must be a number, got None"),
        ("compile", "yes", "compile must be True or False, got 'yes'"),
        ("sample_prompt", 3, "sample_prompt must be a str, got 3"),
        ("stride", 64.0, "stride must be an int or None, got 64.0"),
        ("out_dir", 3, "out_dir must be a str or a path, got 3"),
    ],
)
def test_train_config_names_a_value_of_the_wrong_type(field, value, message, without_shape_checks):
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        TrainConfig(**{field: value})


def test_train_config_takes_paths_and_numpy_numbers_as_what_they_stand_for(
    tmp_path,
    shakespeare_slice,
    without_shape_checks,  # numpy's ints are no ints to jaxtyping's check
):
    """Before: a Path out_dir was taken, and the first checkpoint failed on it ("Object of type
    PosixPath is not JSON serializable") after the steps before it had run."""
    given = {
        "out_dir": tmp_path / "run",
        "cache_dir": tmp_path / "cache",
        "seed": np.int64(3),
        "batch_size": np.int32(4),
    }
    cfg = TrainConfig(**dataclasses.asdict(micro_config(tmp_path, max_steps=2, eval_interval=0)) | given)
    assert (cfg.out_dir, cfg.cache_dir, cfg.seed, cfg.batch_size) == (
        str(tmp_path / "run"),
        str(tmp_path / "cache"),
        3,
        4,
    )
    assert type(cfg.seed) is int and type(cfg.batch_size) is int
    Trainer(cfg, data=shakespeare_slice).run()
    saved = json.loads((latest_checkpoint(tmp_path / "run") / training.TRAIN_CONFIG).read_text())
    assert saved["out_dir"] == str(tmp_path / "run") and saved["seed"] == 3


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="min_lr <= lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    # keep_checkpoints=0 would prune with [:-0], which keeps every checkpoint.
    for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "sample_tokens", "keep_checkpoints"):
        with pytest.raises(ValueError, match=f"^{name} must be >= 1, got 0$"):
            TrainConfig(**{name: 0})
    for name in ("warmup_steps", "eval_interval", "sample_interval", "checkpoint_interval"):
        with pytest.raises(ValueError, match=f"^{name} must be a finite number >= 0, got -1$"):
            TrainConfig(**{name: -1})
    with pytest.raises(ValueError, match="dtype must be"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match="grad_clip must be a finite number >= 0, got -1.0"):
        TrainConfig(grad_clip=-1.0)
    # Values the first optimizer step would have turned into NaN weights (or torch refused only
    # once the data was loaded, or int() refused with an OverflowError).
    for name, value in [("grad_clip", math.nan), ("weight_decay", math.nan), ("weight_decay", math.inf)]:
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value}"):
            TrainConfig(**{name: value})
    for name, value in [("beta1", 1.5), ("beta2", -0.1), ("beta2", 1.0), ("beta1", math.nan)]:
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\), got {value}"):
            TrainConfig(**{name: value})
    for lr in (math.inf, -1.0, 0.0, math.nan):  # not "need 0 < min_lr <= lr" about a min_lr the user never set
        with pytest.raises(ValueError, match=f"^lr must be a finite number > 0, got {lr}$"):
            TrainConfig(lr=lr)
    with pytest.raises(ValueError, match="need 0 < min_lr <= lr, both finite, got min_lr=inf, lr=0.001"):
        TrainConfig(lr=1e-3, min_lr=math.inf)
    with pytest.raises(ValueError, match="min_lr=nan"):
        TrainConfig(min_lr=math.nan)
    for epochs in (0.0, math.inf):
        with pytest.raises(ValueError, match=f"epochs must be a finite number > 0, got {epochs}"):
            TrainConfig(epochs=epochs)
    assert TrainConfig(beta1=0.0, beta2=0.999, grad_clip=0.0, weight_decay=0.0, epochs=0.5).epochs == 0.5
    # Refused before any data is read, not after a hub dataset has been downloaded and tokenized.
    for val_fraction in (1.5, 0.0, 1.0):  # 0 or 1 leaves a split empty
        with pytest.raises(ValueError, match=rf"val_fraction must be in \(0, 1\), got {val_fraction}"):
            TrainConfig(val_fraction=val_fraction)
    for name in ("stride", "max_examples", "num_proc"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1 or None, got 0"):
            TrainConfig(**{name: 0})
    # Before: accepted, then torch's "Overflow when unpacking long long" once the data had loaded.
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"^seed {seed} is outside the range torch's generators take"):
            TrainConfig(seed=seed)
    assert TrainConfig(seed=-1).seed == -1 and TrainConfig(seed=2**64 - 1).seed == 2**64 - 1


def test_pick_device_takes_a_named_device_and_refuses_what_is_not_there(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device("auto") == torch.device("cpu")
    for name in ("foo", "cuda:x", "gpu"):
        with pytest.raises(
            ValueError, match=f"device '{name}' is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ):
            pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:1' requested, but CUDA is not available here"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'mps' requested, but MPS is not available here"):
        pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK: one GPU per process
    with pytest.raises(
        ValueError, match=r"'cuda:2' requested, but this machine has 2 CUDA device\(s\): use cuda:0 to cuda:1"
    ):
        pick_device("cuda:2")


def test_each_update_uses_the_scheduled_learning_rate(tmp_path, shakespeare_slice):
    """The optimizer's own lr, not only the lr the metrics row reports."""
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    used, real_step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append([group["lr"] for group in trainer.optimizer.param_groups])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    rows = [trainer.train_step() for _ in range(8)]
    scheduled = [lr_at(step, trainer.cfg, trainer.max_steps) for step in range(8)]
    assert scheduled[0] == trainer.cfg.lr / 2 and scheduled[-1] < scheduled[2] / 5  # warmup, then cosine decay
    assert [row["lr"] for row in rows] == scheduled
    assert used == [[lr, lr] for lr in scheduled]  # both groups: with and without weight decay


def test_epochs_set_the_step_budget_in_place_of_max_steps_rounding_up(tmp_path, shakespeare_slice):
    # 20,000 tokens make 1,249 windows of 16, so 312 whole batches of 4.
    assert len(shakespeare_slice.loader("train", n_ctx=MICRO.n_ctx, batch_size=4, seed=0)) == 312
    for epochs, grad_accum, steps_per_epoch, max_steps in [
        (1.0, 1, 312, 312),
        (0.01, 1, 312, 4),  # 3.12 steps: the part step is trained, not dropped
        (2.0, 5, 62, 124),  # 312 batches make 62 steps of 5
    ]:
        cfg = micro_config(tmp_path, epochs=epochs, grad_accum=grad_accum, max_steps=1)
        trainer = Trainer(cfg, data=shakespeare_slice)
        assert (trainer.steps_per_epoch, trainer.max_steps) == (steps_per_epoch, max_steps), (epochs, grad_accum)


def test_samples_longer_than_the_context_are_refused_up_front(tmp_path, shakespeare_slice):
    # MICRO has n_ctx 16; "ROMEO:" is 4 tokens with <|endoftext|> in front.
    with pytest.raises(ValueError, match=r"sample_prompt \(4 tokens .*\) \+ sample_tokens=13 exceed .* n_ctx=16"):
        Trainer(micro_config(tmp_path, sample_tokens=13), data=shakespeare_slice)
    Trainer(micro_config(tmp_path, sample_tokens=12), data=shakespeare_slice)  # exactly fits


@pytest.mark.parametrize("training_mode", [True, False])
def test_sample_text_continues_the_prompt_and_leaves_the_model_in_its_mode(training_mode):
    model = Transformer(MICRO).train(training_mode)
    text = sample_text(model, "ROMEO:", 5, seed=0)
    assert text.startswith("ROMEO:")  # the <|endoftext|> in front of the prompt is not part of it
    assert model.training is training_mode


def test_lm_loss_is_uniform_cross_entropy_for_flat_logits():
    logits = torch.zeros(2, 3, 50257)
    assert lm_loss(logits, torch.zeros(2, 3, dtype=torch.long)).item() == pytest.approx(math.log(50257))


def _unembed_problem(seed: int = 0):
    """14 positions of d_model 16 into a 300-token vocabulary, with a non-zero b_U."""
    gen = torch.Generator().manual_seed(seed)
    unembed = Unembedding(TransformerConfig(d_model=16, n_heads=2, d_head=8, d_vocab=300))
    with torch.no_grad():
        unembed.W_U.normal_(generator=gen)
        unembed.b_U.normal_(generator=gen)
    x = torch.randn(2, 7, 16, generator=gen).requires_grad_()
    return x, unembed, torch.randint(0, 300, (2, 7), generator=gen)


def _loss_and_grads(loss_fn, x, unembed, targets):
    leaves = (x, unembed.W_U, unembed.b_U)
    for leaf in leaves:
        leaf.grad = None
    loss = loss_fn(x, unembed, targets)
    (3.0 * loss).backward()  # a non-unit incoming gradient, which backward must scale by
    return loss.detach(), [leaf.grad for leaf in leaves], type(loss.grad_fn).__name__


def _reference_loss(x, unembed, targets):
    return lm_loss(unembed(x), targets)


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one-chunk", "chunks-of-5"])
def test_unembed_lm_loss_equals_lm_loss_in_value_and_gradients(chunk_rows):
    problem = _unembed_problem()
    expected, expected_grads, _ = _loss_and_grads(_reference_loss, *problem)
    loss, grads, node = _loss_and_grads(lambda *args: unembed_lm_loss(*args, chunk_rows=chunk_rows), *problem)
    assert node == "_UnembedCrossEntropyBackward"  # the fused path ran, not lm_loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for name, grad, want in zip(["x", "W_U", "b_U"], grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7, msg=name)
    assert grads[1].stride() == problem[1].W_U.stride()  # laid out like W_U itself: no copy on accumulation


def test_unembed_lm_loss_under_bf16_autocast_keeps_a_float32_softmax():
    problem = _unembed_problem(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads, _ = _loss_and_grads(_reference_loss, *problem)
        loss, grads, node = _loss_and_grads(unembed_lm_loss, *problem)
    assert node == "_UnembedCrossEntropyBackward"
    assert loss.dtype == torch.float32
    # Both round the same bf16 products; the losses then agree to float32 rounding, the gradients
    # (bf16 matrix products in both) to bf16 rounding.
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for name, grad, want in zip(["x", "W_U", "b_U"], grads, expected_grads, strict=True):
        assert grad.dtype == want.dtype == torch.float32
        torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one-chunk", "chunks-of-5"])
def test_unembed_lm_loss_leaves_out_ignore_index_targets_as_lm_loss_does(chunk_rows, autocast):
    """Before: "index -100 is out of bounds for dimension 1" when gradients were wanted, while the
    same call without them (lm_loss, F.cross_entropy) left those positions out of the mean."""
    x, unembed, targets = _unembed_problem(seed=4)
    targets[0, :3] = IGNORE_INDEX  # 11 of the 14 positions count, in both chunks of 5 and alone
    targets[1, 6] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected, expected_grads, _ = _loss_and_grads(_reference_loss, x, unembed, targets)
        loss, grads, node = _loss_and_grads(
            lambda *args: unembed_lm_loss(*args, chunk_rows=chunk_rows), x, unembed, targets
        )
    assert node == "_UnembedCrossEntropyBackward"
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # float32: the two round sums of 300 O(1) products in other orders, to ~4e-7 of grad_x's O(1)
    # entries (as without ignored targets, at other seeds); bf16: the products' own rounding.
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for name, grad, want in zip(["x", "W_U", "b_U"], grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, **tolerance, msg=name)
    assert grads[0][0, :3].abs().sum() == 0 and grads[0][1, 6].abs().sum() == 0  # no gradient from them
    assert grads[0][0, 3:].abs().sum() > 0


def test_unembed_lm_loss_of_only_ignored_targets_is_nan_as_lm_loss():
    x, unembed, targets = _unembed_problem(seed=5)
    targets.fill_(IGNORE_INDEX)
    assert torch.isnan(_reference_loss(x, unembed, targets))
    loss = unembed_lm_loss(x, unembed, targets)
    assert type(loss.grad_fn).__name__ == "_UnembedCrossEntropyBackward" and torch.isnan(loss)


def test_unembed_lm_loss_without_gradients_is_plain_lm_loss():
    x, unembed, targets = _unembed_problem(seed=2)
    with torch.no_grad():
        loss = unembed_lm_loss(x, unembed, targets)
        assert loss.grad_fn is None
        torch.testing.assert_close(loss, _reference_loss(x, unembed, targets), rtol=0, atol=0)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        unembed_lm_loss(x, unembed, targets, chunk_rows=0)


def test_trainer_fused_and_plain_losses_give_the_same_gradients(tmp_path, shakespeare_slice):
    gen = torch.Generator().manual_seed(3)
    inputs, targets = torch.randint(0, 50257, (2, 2, MICRO.n_ctx), generator=gen)
    batch = [(inputs, targets)]
    grads = []
    for fused, node in [(True, "_UnembedCrossEntropyBackward"), (False, "NllLossBackward0")]:
        trainer = Trainer(micro_config(tmp_path / str(fused), fused_loss=fused), data=shakespeare_slice)
        assert type(trainer.loss_fn(inputs, targets).grad_fn).__name__ == node  # each path is the one asked for
        trainer.forward_backward(batch)
        grads.append({n: p.grad for n, p in trainer.model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-8, msg=name)


def _compiled_step_worker(rank, batch, data, out_dir):
    PRESETS["micro"] = MICRO
    torch.set_num_threads(1)
    trainer = Trainer(micro_config(out_dir, compile=True), data=data)
    trainer.forward_backward(batch)
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    # Whether this process runs the modules as users do, without the suite's jaxtyping wrappers.
    grads["wrapped"] = torch.tensor(hasattr(training.unembed_lm_loss, "__wrapped__"))
    grads["graphs"] = torch.tensor(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch.save(grads, Path(out_dir) / "compiled-grads.pt")


@pytest.mark.slow
def test_compiled_trainer_step_with_the_fused_loss_equals_eager(tmp_path, shakespeare_slice):
    """torch.compile traces the fused loss's autograd.Function into the step's one graph (as
    --compile does on a GPU) and gives the eager gradients.

    The compiled step runs in a spawned process, which imports the modules without the jaxtyping
    wrappers that the suite's shape checks put around every function (as a user's program does):
    torch 2.10 and earlier cannot trace the fused loss through those and split the step in three.
    """
    gen = torch.Generator().manual_seed(4)
    batch = [tuple(torch.randint(0, 50257, (2, 2, MICRO.n_ctx), generator=gen))]
    mp.spawn(_compiled_step_worker, args=(batch, shakespeare_slice, str(tmp_path)), nprocs=1, join=True)
    compiled = torch.load(tmp_path / "compiled-grads.pt", weights_only=True)
    assert not compiled.pop("wrapped")
    assert compiled.pop("graphs") == 1  # one graph: no breaks
    eager = Trainer(micro_config(tmp_path / "eager"), data=shakespeare_slice)
    eager.forward_backward(batch)
    for name, p in eager.model.named_parameters():
        torch.testing.assert_close(compiled[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


# --- learning ---------------------------------------------------------------------------------


def test_loss_decreases_within_a_few_dozen_steps(tmp_path, shakespeare_slice):
    cfg = micro_config(tmp_path, max_steps=40, batch_size=8, warmup_steps=5, eval_interval=20)
    rows = Trainer(cfg, data=shakespeare_slice).run()
    train = losses(rows)
    first, last = train[1], np.mean([train[s] for s in range(36, 41)])
    assert first > math.log(50257) - 0.5  # starts near uniform
    assert last < first - 2.0, (first, last)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]


def test_gradient_accumulation_equals_one_batch_of_the_same_windows(tmp_path, shakespeare_slice):
    """grad_accum=2 of 2 windows takes the gradient of the mean loss over the 4, as batch_size=4 does:
    the same windows in the same order (one sampler), so the same logged loss, gradient norm and
    updated weights, up to the order of float32 sums."""
    rows, weights = [], []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        trainer = Trainer(micro_config(tmp_path / f"{grad_accum}", batch_size=batch_size, grad_accum=grad_accum),
                          data=shakespeare_slice)  # fmt: skip
        rows.append(trainer.train_step())
        weights.append(torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach())
    assert rows[0]["tokens"] == rows[1]["tokens"] == 4 * MICRO.n_ctx
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert rows[1]["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-5)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_gradients_are_clipped_to_grad_clip_before_the_update(tmp_path, shakespeare_slice, monkeypatch):
    """AdamW's first step hardly depends on the gradient's scale, so the weights cannot show the
    clipping: the gradient the optimizer receives is read instead. The row keeps the norm before."""
    seen = []
    step = torch.optim.AdamW.step

    def spying_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spying_step)
    unclipped = Trainer(micro_config(tmp_path / "off", grad_clip=0.0), data=shakespeare_slice).train_step()
    clipped = Trainer(micro_config(tmp_path / "on", grad_clip=0.05), data=shakespeare_slice).train_step()
    assert unclipped["grad_norm"] > 0.5  # so that 0.05 clips (measured: 1.86)
    assert seen[0] == pytest.approx(unclipped["grad_norm"], rel=1e-5)
    assert clipped["grad_norm"] == pytest.approx(unclipped["grad_norm"], rel=1e-6)  # the norm before clipping
    assert seen[1] == pytest.approx(0.05, rel=1e-4)


def test_each_epoch_draws_a_fresh_order_of_every_window(tmp_path):
    """6 windows, batch 2: 3 steps an epoch. Each epoch sees every window once, in its own order
    (a permutation from the seed and the epoch), and the position counts the epochs."""
    rng = np.random.default_rng(0)
    data = TokenData(rng.integers(0, 50257, 6 * 17 + 1).astype(np.uint16), rng.integers(0, 50257, 200), "tiny")
    trainer = Trainer(micro_config(tmp_path, batch_size=2, max_steps=9, eval_interval=0), data=data)
    epochs = []
    for _ in range(3):
        windows = [trainer.next_batch()[0] for _ in range(3)]
        epochs.append([tuple(window.tolist()) for batch in windows for window in batch])
    assert trainer.position.epoch == 2
    everything = {tuple(data.train[i * 16 : i * 16 + 16].tolist()) for i in range(6)}
    assert all(set(epoch) == everything and len(epoch) == 6 for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # three different orders


def test_outputs_metrics_plot_samples_and_checkpoints(tmp_path, shakespeare_slice):
    cfg = micro_config(tmp_path, max_steps=6, eval_interval=3, keep_checkpoints=1)
    Trainer(cfg, data=shakespeare_slice).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"tokens", "loss", "lr", "grad_norm", "tok_per_s"} <= set(rows[1])
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "samples.txt").read_text().count("--- sample") == 2  # before and after
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-0000006"]  # one kept, no temporary directories left
    model = Transformer.load(latest_checkpoint(tmp_path))
    assert model.cfg == MICRO


def test_samples_come_every_sample_interval_and_the_last_steps_at_the_end(tmp_path, shakespeare_slice):
    Trainer(micro_config(tmp_path, max_steps=8, sample_interval=4), data=shakespeare_slice).run()
    headings = re.findall(r"--- sample, (.*) ---", (tmp_path / "samples.txt").read_text())
    assert headings == ["before training", "step 4", "step 8 (end)"]


def test_trainer_names_arguments_of_the_wrong_type_before_anything_runs(
    tmp_path, shakespeare_slice, without_shape_checks
):
    """Before: resume="no" was truthy and resumed the earlier run; a dataset's name for data, or a
    dict for cfg, failed with AttributeError ("'str' object has no attribute 'loader'")."""
    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=2)
    with pytest.raises(TypeError, match=r"^resume must be True or False, got 'no'$"):
        Trainer(micro_config(tmp_path), data=shakespeare_slice, resume="no")
    for data in ("shakespeare", np.array(shakespeare_slice.train)):
        with pytest.raises(TypeError, match=r"^data must be a TokenData \(TokenData.load\(...\)\) or None, got "):
            Trainer(micro_config(tmp_path / "other"), data=data)
    with pytest.raises(
        TypeError, match=r"^cfg must be a TrainConfig, got dict; build one with TrainConfig\(\*\*settings\)$"
    ):
        Trainer({"preset": "micro", "out_dir": str(tmp_path / "other")}, data=shakespeare_slice)
    assert not (tmp_path / "other").exists()
    assert Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True).step == 2


def test_run_names_a_stop_at_that_is_no_step(tmp_path, shakespeare_slice, without_shape_checks):
    """Before: 2.5 trained two steps, True one, 0 and -1 none, and "3" failed with
    "'<' not supported between instances of 'int' and 'str'"."""
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    for stop_at, error, message in [
        (2.5, TypeError, r"^stop_at must be an int \(the step to stop after\) or None, got 2\.5$"),
        (True, TypeError, r"^stop_at must be an int \(the step to stop after\) or None, got True$"),
        ("3", TypeError, r"^stop_at must be an int \(the step to stop after\) or None, got '3'$"),
        (0, ValueError, r"^stop_at must be >= 1 \(the step to stop after\) or None, got 0$"),
        (-1, ValueError, r"^stop_at must be >= 1 \(the step to stop after\) or None, got -1$"),
    ]:
        with pytest.raises(error, match=message):
            trainer.run(stop_at=stop_at)
    assert trainer.step == 0 and not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran
    assert [r["step"] for r in trainer.run(stop_at=np.int64(2)) if "loss" in r] == [1, 2]


def test_run_stops_at_max_steps_even_when_told_to_stop_later(tmp_path, shakespeare_slice):
    rows = Trainer(micro_config(tmp_path, max_steps=3), data=shakespeare_slice).run(stop_at=10)
    assert max(losses(rows)) == 3 and latest_checkpoint(tmp_path).name == "step-0000003"


def test_each_evaluation_reads_the_same_validation_batches(tmp_path, shakespeare_slice):
    trainer = Trainer(micro_config(tmp_path, eval_batches=1), data=shakespeare_slice)  # 1 of 62 batches
    first = trainer.evaluate()
    trainer.step = 5  # a later evaluation of the same weights
    assert trainer.evaluate() == first


def test_a_validation_loss_too_large_for_exp_reports_a_capped_perplexity(tmp_path, shakespeare_slice, monkeypatch):
    """math.exp(800.0) raises OverflowError: a diverging run must not crash in its log line."""
    trainer = Trainer(micro_config(tmp_path, max_steps=4), data=shakespeare_slice)
    monkeypatch.setattr(trainer, "evaluate", lambda: 800.0)
    rows = trainer.run()
    assert [r["val_ppl"] for r in rows if "val_ppl" in r] == [math.exp(50.0)]  # one evaluation, at step 4


def test_a_checkpoint_of_nothing_new_is_not_written_again(tmp_path, shakespeare_slice):
    """The last step is evaluated (and checkpointed) and then run() ends with a checkpoint: once
    is enough, for a 124M model's 1.5 GB of weights and optimizer state."""
    trainer = Trainer(micro_config(tmp_path, max_steps=4, eval_interval=4), data=shakespeare_slice)
    trainer.run()
    saved = latest_checkpoint(tmp_path)

    def written() -> tuple[int, int]:  # a rewrite replaces the directory and its files
        return saved.stat().st_ino, (saved / training.TRAINER_STATE).stat().st_mtime_ns

    before = written()
    assert trainer.save_checkpoint() == saved
    assert written() == before


def test_loss_curve_png_has_the_expected_size(tmp_path):
    rows = [{"step": 0, "tokens": 0, "unigram_val_loss": 7.0}]
    rows += [{"step": s, "tokens": 64 * s, "loss": 10.0 - 0.1 * s} for s in range(1, 30)]
    rows += [{"step": 10, "tokens": 640, "val_loss": 9.0}, {"step": 20, "tokens": 1280, "val_loss": 8.0}]
    plot_loss_curve(rows, tmp_path / "curve.png")
    from PIL import Image

    with Image.open(tmp_path / "curve.png") as image:
        assert image.size == (880, 550)  # 8 x 5 inches at 110 dpi


def test_the_loss_curve_leaves_matplotlib_s_backend_and_pyplot_alone(tmp_path):
    """Before, it called matplotlib.use("Agg"): a notebook that trained drew no more inline plots."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any other than Agg, as a notebook's inline backend is
    try:
        plot_loss_curve([{"step": 1, "tokens": 64, "loss": 9.0}], tmp_path / "curve.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []  # and no figure left open in pyplot
    finally:
        matplotlib.use(before)


def test_loss_curve_draws_raw_and_smoothed_train_loss_validation_and_the_unigram_baseline(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *args, **kwargs: (figures.append(fig), savefig(fig, *args, **kwargs))
    )
    rows = [{"step": 0, "tokens": 0, "unigram_val_loss": 7.0}]
    rows += [{"step": s, "tokens": 64 * s, "loss": float(10 + s % 2 - 0.1 * s)} for s in range(1, 6)]
    rows += [{"step": 4, "tokens": 256, "val_loss": 9.0}]
    plot_loss_curve(rows, tmp_path / "curve.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["train (EMA 0.9)", "train (per step)", "unigram baseline (7.00)", "validation"]
    train = [r["loss"] for r in rows if "loss" in r]
    assert list(lines["train (per step)"].get_xdata()) == [64, 128, 192, 256, 320]
    assert list(lines["train (per step)"].get_ydata()) == train
    ema, expected = train[0], []
    for value in train:
        ema = 0.9 * ema + 0.1 * value
        expected.append(ema)
    torch.testing.assert_close(list(lines["train (EMA 0.9)"].get_ydata()), expected, rtol=1e-12, atol=0)
    assert (list(lines["validation"].get_xdata()), list(lines["validation"].get_ydata())) == ([256], [9.0])
    assert list(lines["unigram baseline (7.00)"].get_ydata()) == [7.0, 7.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)


# --- checkpoints and resume -------------------------------------------------------------------


@pytest.mark.parametrize(("checkpoint_interval", "steps"), [(0, [4, 8]), (3, [3, 6, 8])])
def test_checkpoints_come_every_checkpoint_interval_steps_else_at_each_evaluation_and_at_the_end(
    checkpoint_interval, steps, tmp_path, shakespeare_slice
):
    cfg = micro_config(tmp_path, eval_interval=4, checkpoint_interval=checkpoint_interval, keep_checkpoints=5)
    Trainer(cfg, data=shakespeare_slice).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [f"step-{s:07d}" for s in steps]


def test_only_rank_0_writes_checkpoints(tmp_path, shakespeare_slice):
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    trainer.train_step()
    trainer.dist = training.DistInfo(rank=1, world_size=2)
    assert trainer.save_checkpoint() is None
    assert not (tmp_path / "checkpoints").exists()
    trainer.dist = training.DistInfo()
    assert trainer.save_checkpoint() == tmp_path / "checkpoints" / "step-0000001"


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
def test_resume_continues_exactly(tie_embeddings, tmp_path, shakespeare_slice):
    config = lambda out_dir: micro_config(out_dir, tie_embeddings=tie_embeddings)  # noqa: E731
    whole = Trainer(config(tmp_path / "whole"), data=shakespeare_slice).run()

    Trainer(config(tmp_path / "split"), data=shakespeare_slice).run(stop_at=3)
    resumed_trainer = Trainer(config(tmp_path / "split"), data=shakespeare_slice, resume=True)
    assert resumed_trainer.step == 3
    assert training.embeddings_tied(resumed_trainer.model) == tie_embeddings  # loading keeps W_U a view of W_E
    resumed = resumed_trainer.run()

    a, b = losses(whole), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # the log holds every step once
    for step in range(4, 9):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical on CPU
    assert [r["val_loss"] for r in whole if "val_loss" in r] == [r["val_loss"] for r in resumed if "val_loss" in r]


def test_resume_restores_the_global_random_states(tmp_path, shakespeare_slice, without_shape_checks):
    """The trainer itself draws nothing from the global RNGs after its seeded init, so the
    loss-equality test above cannot see whether it restores them. Code around it may draw (a
    subclass with dropout, a callback): a resumed run continues from the checkpoint's states.
    Shape checks off, as in a user's run: beartype, which they run on, draws from Python's RNG."""
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    torch.rand(7), np.random.rand(7), random.random()  # another's draws, before the checkpoint
    trainer.run(stop_at=3)

    def draws() -> tuple:
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    expected = draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True)
    assert draws() == expected
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    Trainer(micro_config(tmp_path / "fresh"), data=shakespeare_slice)  # without resume: not those states
    assert all(ours != theirs for ours, theirs in zip(draws(), expected, strict=True))


def test_a_cpu_trainer_gives_fused_adamw_contiguous_parameters(tmp_path, shakespeare_slice):
    # The model's own layout has transposed views (what the GPU matrix multiplies want) ...
    assert {n for n, p in Transformer(MICRO).named_parameters() if not p.is_contiguous()} >= {
        "blocks.0.attn.W_Q", "unembed.W_U"
    }  # fmt: skip
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    # ... which aten's CPU fused AdamW copies in every step: the trainer's CPU model has none.
    assert [n for n, p in trainer.model.named_parameters() if not p.is_contiguous()] == []
    assert trainer.optimizer.defaults["fused"]


def test_the_optimizer_and_autocast_take_the_configs_settings(tmp_path, shakespeare_slice):
    cfg = micro_config(tmp_path, beta1=0.8, beta2=0.99, weight_decay=0.05, dtype="bfloat16")
    trainer = Trainer(cfg, data=shakespeare_slice)
    assert [g["betas"] for g in trainer.optimizer.param_groups] == [(0.8, 0.99)] * 2
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05, 0.0]
    # dtype="bfloat16" autocasts on a CPU too ("auto" would give float32 there)
    assert trainer.autocast_dtype == torch.bfloat16
    with trainer.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert Trainer(micro_config(tmp_path / "auto"), data=shakespeare_slice).autocast_dtype is None


def test_embeddings_are_tied_only_by_the_transposed_view():
    model = Transformer(MICRO)
    assert not training.embeddings_tied(model)
    training.tie_embeddings(model)
    assert training.embeddings_tied(model)
    with torch.no_grad():  # the same memory read in another order is not W_E^T
        model.unembed.W_U.data = model.embed.W_E.data.reshape(MICRO.d_model, MICRO.d_vocab)
    assert not training.embeddings_tied(model)


def test_folding_a_tied_gradient_into_no_embedding_gradient_gives_a_contiguous_copy():
    model = Transformer(MICRO)
    training.tie_embeddings(model)
    grad_U = torch.randn(MICRO.d_model, MICRO.d_vocab)
    model.unembed.W_U.grad = grad_U
    training.fold_tied_gradient(model)  # W_E has no gradient of its own yet
    assert model.unembed.W_U.grad is None
    torch.testing.assert_close(model.embed.W_E.grad, grad_U.T, rtol=0, atol=0)
    # laid out as W_E (fused AdamW would copy a transposed one each step), not a view of W_U's gradient
    assert model.embed.W_E.grad.is_contiguous() and model.embed.W_E.grad.data_ptr() != grad_U.data_ptr()


def test_match_state_layouts_pairs_each_weight_with_its_own_moments():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(5, 3).T)  # transposed, as W_U is on a GPU
    reference = torch.nn.Parameter(W.detach().clone())

    def optimizer(param):
        # laid out as the parameter, as autograd lays out a gradient
        param.grad = torch.empty_like(param).copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        opt = torch.optim.AdamW([param], lr=0.1, foreach=False, fused=param is W or None)
        opt.step()
        return opt

    fused, plain = optimizer(W), optimizer(reference)
    # As a checkpoint written with the other layout loads: contiguous moments for a transposed weight.
    for key in ("exp_avg", "exp_avg_sq"):
        fused.state[W][key] = fused.state[W][key].contiguous()
    training.match_state_layouts(fused)
    assert all(fused.state[W][k].stride() == W.stride() for k in ("exp_avg", "exp_avg_sq"))
    torch.testing.assert_close(fused.state[W]["exp_avg"], plain.state[reference]["exp_avg"], rtol=0, atol=0)
    fused.step()
    plain.step()
    torch.testing.assert_close(W, reference, rtol=1e-6, atol=1e-7)


def test_resume_on_a_cpu_of_a_checkpoint_with_the_gpu_layout_continues_the_run(
    tmp_path, shakespeare_slice, monkeypatch
):
    # A GPU run keeps the model's own layout (transposed views); a CPU one makes them contiguous.
    contiguous = training.make_parameters_contiguous
    monkeypatch.setattr(training, "make_parameters_contiguous", lambda model: None)
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice).run(stop_at=3)
    monkeypatch.setattr(training, "make_parameters_contiguous", contiguous)
    trainer = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True)
    for param, state in trainer.optimizer.state.items():
        assert param.is_contiguous() and state["exp_avg"].stride() == param.stride()
    a, b = losses(whole), losses(trainer.run())
    # Up to float rounding, which the two layouts' matrix multiplies may do differently.
    torch.testing.assert_close([b[step] for step in range(4, 9)], [a[step] for step in range(4, 9)], rtol=1e-5, atol=0)


def test_without_the_unembedding_bias_b_U_stays_zero_and_the_run_exports_exactly(tmp_path, shakespeare_slice):
    from transformers import GPT2LMHeadModel

    trained = Trainer(micro_config(tmp_path / "with"), data=shakespeare_slice)
    trained.run()
    assert trained.model.unembed.b_U.abs().max() > 1e-3  # by default b_U learns, as in TransformerLens
    trainer = Trainer(micro_config(tmp_path / "without", unembed_bias=False), data=shakespeare_slice)
    assert "unembed.b_U" not in [name for group in param_groups(trainer.model, 0.1) for name in group["names"]]
    rows = trainer.run()
    assert losses(rows)[8] < losses(rows)[1]  # it still learns
    assert torch.equal(trainer.model.unembed.b_U, torch.zeros_like(trainer.model.unembed.b_U))
    directory = gpt2_small.export_hf(trainer.model, tmp_path / "hf", tokenizer=False)  # nothing to drop
    tokens = torch.randint(0, MICRO.d_vocab, (2, MICRO.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = GPT2LMHeadModel.from_pretrained(directory).eval()(tokens).logits
        torch.testing.assert_close(hf_logits, trainer.model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, default", [("unembed_bias", True), ("tie_embeddings", False)])
def test_resume_refuses_to_switch_a_setting_that_shapes_the_optimizer_state(
    field, default, tmp_path, shakespeare_slice
):
    def refusal(value: bool) -> str:
        return f"trained with {field}={value}; resume with --{'' if value else 'no-'}{field.replace('_', '-')} "

    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=3)
    with pytest.raises(CheckpointMismatchError, match=refusal(default)):
        Trainer(micro_config(tmp_path, **{field: not default}), data=shakespeare_slice, resume=True)
    Trainer(micro_config(tmp_path / "other", **{field: not default}), data=shakespeare_slice).run(stop_at=3)
    with pytest.raises(CheckpointMismatchError, match=refusal(not default)):
        Trainer(micro_config(tmp_path / "other"), data=shakespeare_slice, resume=True)
    resumed = Trainer(micro_config(tmp_path / "other", **{field: not default}), data=shakespeare_slice, resume=True)
    assert resumed.step == 3


def test_a_resume_that_switches_both_unembedding_settings_names_both_flags(tmp_path, shakespeare_slice):
    # As a --preset gpt2 run from before its defaults became GPT-2's form would, resumed now.
    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=2)
    both = micro_config(tmp_path, tie_embeddings=True, unembed_bias=False)
    message = "trained with tie_embeddings=False, unembed_bias=True; resume with --no-tie-embeddings --unembed-bias "
    with pytest.raises(CheckpointMismatchError, match=message):
        Trainer(both, data=shakespeare_slice, resume=True)


def test_tied_embeddings_train_one_matrix_and_checkpoint_it_as_a_plain_model(tmp_path, shakespeare_slice):
    assert not training.embeddings_tied(Trainer(micro_config(tmp_path / "untied"), data=shakespeare_slice).model)
    trainer = Trainer(micro_config(tmp_path / "tied", tie_embeddings=True), data=shakespeare_slice)
    model = trainer.model
    assert training.embeddings_tied(model)
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.embed.W_E) in trained and id(model.unembed.W_U) not in trained
    assert trainer.trained_params == model.num_params() - model.unembed.W_U.numel()
    W_E_before = model.embed.W_E.detach().clone()
    rows = trainer.run()
    assert losses(rows)[8] < losses(rows)[1]
    assert training.embeddings_tied(model) and torch.equal(model.unembed.W_U, model.embed.W_E.T)
    assert (model.embed.W_E - W_E_before).abs().max() > 1e-3  # the update reached the shared matrix
    saved = Transformer.load(latest_checkpoint(tmp_path / "tied"))
    assert torch.equal(saved.embed.W_E, model.embed.W_E) and torch.equal(saved.unembed.W_U, model.unembed.W_U)
    assert not training.embeddings_tied(saved)  # memory of its own, as any loaded model's


def test_the_tied_gradient_is_the_gradient_of_one_shared_matrix(tmp_path, shakespeare_slice):
    gen = torch.Generator().manual_seed(5)
    inputs, targets = torch.randint(0, 50257, (2, 2, MICRO.n_ctx), generator=gen)
    trainer = Trainer(micro_config(tmp_path, tie_embeddings=True), data=shakespeare_slice)
    model = trainer.model
    # The reference: the loss as a function of one matrix E that is both W_E and W_U = E^T.
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if n != "unembed.W_U"}
    E = params["embed.W_E"]
    lm_loss(torch.func.functional_call(model, params | {"unembed.W_U": E.T}, (inputs,)), targets).backward()
    trainer.forward_backward([(inputs, targets)])
    assert model.unembed.W_U.grad is None  # folded into W_E's, so clipping counts it once
    for name, reference in params.items():
        torch.testing.assert_close(model.get_parameter(name).grad, reference.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_a_tied_run_without_b_U_exports_as_gpt2_does_with_no_lm_head(tmp_path, shakespeare_slice):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    trainer = Trainer(micro_config(tmp_path, tie_embeddings=True, unembed_bias=False), data=shakespeare_slice)
    trainer.run()
    directory = gpt2_small.export_hf(trainer.model, tmp_path / "hf", tokenizer=False)
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert "transformer.wte.weight" in f.keys() and "lm_head.weight" not in f.keys()
    assert json.loads((directory / "config.json").read_text()).get("tie_word_embeddings", True)
    tokens = torch.randint(0, MICRO.d_vocab, (2, MICRO.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = GPT2LMHeadModel.from_pretrained(directory).eval()(tokens).logits
        torch.testing.assert_close(hf_logits, trainer.model(tokens), rtol=1e-5, atol=1e-5)


def test_resume_survives_a_metrics_line_cut_off_by_a_crash(tmp_path, shakespeare_slice, caplog):
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    split = tmp_path / "split"
    Trainer(micro_config(split), data=shakespeare_slice).run(stop_at=4)
    with (split / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "tokens": 3')  # a crash in the middle of the next append
    caplog.set_level("WARNING", logger="gpt2_small.training")
    resumed = Trainer(micro_config(split), data=shakespeare_slice, resume=True).run()  # before: JSONDecodeError
    assert "dropping its last line, cut off in the middle of a write" in caplog.text
    assert losses(resumed) == losses(whole)
    logged = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert logged == resumed
    # anywhere but at the end, a broken line is not a torn write: say where it is instead of guessing
    lines = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON .*; fix or delete that line"):
        Trainer(micro_config(split), data=shakespeare_slice, resume=True)


def test_resume_warns_when_settings_that_shape_training_changed(tmp_path, shakespeare_slice, caplog):
    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=3)
    caplog.set_level("WARNING", logger="gpt2_small.training")
    Trainer(micro_config(tmp_path, eval_batches=1, keep_checkpoints=3), data=shakespeare_slice, resume=True)
    assert not [r for r in caplog.records if "differ from the checkpoint" in r.getMessage()]  # outside the trajectory

    Trainer(micro_config(tmp_path, lr=5e-3, max_steps=12), data=shakespeare_slice, resume=True)
    (warning,) = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
    assert "'lr': (0.01, 0.005)" in warning and "'max_steps': (8, 12)" in warning
    assert "min_lr" not in warning  # given explicitly in both runs (1e-3): unchanged


def test_resume_crosses_an_epoch_boundary_exactly(tmp_path):
    rng = np.random.default_rng(0)
    data = TokenData(rng.integers(0, 50257, 6 * 17 + 1).astype(np.uint16), rng.integers(0, 50257, 200), "tiny")
    cfg = dict(batch_size=2, max_steps=7, eval_interval=0)  # 6 windows -> 3 steps per epoch
    whole = Trainer(micro_config(tmp_path / "whole", **cfg), data=data).run()
    Trainer(micro_config(tmp_path / "split", **cfg), data=data).run(stop_at=4)
    resumed = Trainer(micro_config(tmp_path / "split", **cfg), data=data, resume=True).run()
    assert losses(whole) == losses(resumed)


@pytest.mark.parametrize(
    ("field", "what"),
    [
        ("out_dir", "a directory"),
        ("cache_dir", "a directory"),
        ("dataset", "'shakespeare', a hub dataset or a local path"),
    ],
)
def test_an_empty_path_field_is_refused_not_taken_for_the_working_directory(field, what):
    """Before: out_dir="" trained into the working directory, and dataset="" read it as a local dataset."""
    with pytest.raises(ValueError, match=rf"^{field} is empty; name {re.escape(what)} \('\.' for the working"):
        TrainConfig(**{field: ""})


def test_an_out_dir_under_home_is_expanded(home, shakespeare_slice):
    Trainer(micro_config("~/run", max_steps=2, eval_interval=0), data=shakespeare_slice).run()
    assert latest_checkpoint(home / "run") is not None and not Path("~").exists()
    assert latest_checkpoint("~/run") == latest_checkpoint(home / "run")


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, shakespeare_slice, monkeypatch):
    Trainer(micro_config(tmp_path, max_steps=2), data=shakespeare_slice).run()
    monkeypatch.setitem(
        PRESETS, "micro2", TransformerConfig(d_model=16, n_layers=3, n_heads=2, d_head=8, d_mlp=32, n_ctx=16)
    )
    with pytest.raises(CheckpointMismatchError, match=r"n_layers.*\(2, 3\)"):
        Trainer(micro_config(tmp_path, preset="micro2"), data=shakespeare_slice, resume=True)


def test_resume_refuses_a_run_it_cannot_continue_before_loading_the_data(tmp_path, shakespeare_slice, monkeypatch):
    """Before: the data loaded first (a hub download, or minutes of tokenizing a large corpus), and
    only then came the word that there was no checkpoint, or one of another model."""
    Trainer(micro_config(tmp_path / "run", max_steps=2), data=shakespeare_slice).run()
    monkeypatch.setattr(Trainer, "_load_data", lambda self: pytest.fail("the data was loaded"))
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint in .*empty/checkpoints; start without"):
        Trainer(micro_config(tmp_path / "empty"), resume=True)
    monkeypatch.setitem(
        PRESETS, "micro2", TransformerConfig(d_model=16, n_layers=3, n_heads=2, d_head=8, d_mlp=32, n_ctx=16)
    )
    with pytest.raises(CheckpointMismatchError, match=r"n_layers.*\(2, 3\)"):
        Trainer(micro_config(tmp_path / "run", preset="micro2"), resume=True)
    with pytest.raises(CheckpointMismatchError, match="was trained with tie_embeddings=False; resume with"):
        Trainer(micro_config(tmp_path / "run", tie_embeddings=True), resume=True)


def test_resuming_a_finished_run_says_to_raise_max_steps(tmp_path, shakespeare_slice):
    """Before: it wrote the same checkpoint again and appended a second end sample to samples.txt."""
    Trainer(micro_config(tmp_path, max_steps=3), data=shakespeare_slice).run()
    samples = (tmp_path / "samples.txt").read_text()
    for max_steps in (3, 2):
        with pytest.raises(ValueError, match=rf"checkpoint step-0000003 is at step 3, and max_steps={max_steps} "
                           r"leaves nothing to train; raise --max-steps \(or --epochs\)"):  # fmt: skip
            Trainer(micro_config(tmp_path, max_steps=max_steps), data=shakespeare_slice, resume=True)
    # A budget given in epochs is named as given, with the steps it comes to (here 1 of 3 done)
    with pytest.raises(ValueError, match=r"is at step 3, and epochs=0\.001 \(1 step\) leaves nothing to train"):
        Trainer(micro_config(tmp_path, epochs=0.001), data=shakespeare_slice, resume=True)
    assert (tmp_path / "samples.txt").read_text() == samples
    assert Trainer(micro_config(tmp_path, max_steps=4), data=shakespeare_slice, resume=True).run()[-1]["step"] == 4


def test_resuming_past_a_lowered_max_steps_says_to_raise_it(tmp_path, shakespeare_slice):
    """A checkpoint stopped between evaluations (step 6, evaluated at 4) is unfinished business at
    max_steps=8, but beyond max_steps=5 there is nothing to train, evaluate or sample."""
    Trainer(micro_config(tmp_path, max_steps=8, eval_interval=4), data=shakespeare_slice).run(stop_at=6)
    with pytest.raises(ValueError, match=r"checkpoint step-0000006 is at step 6, and max_steps=5 leaves nothing"):
        Trainer(micro_config(tmp_path, max_steps=5, eval_interval=4), data=shakespeare_slice, resume=True)


def test_resume_names_a_damaged_trainer_state(tmp_path, shakespeare_slice):
    """Before: torch's "PytorchStreamReader failed reading zip archive" traceback from train_demo."""
    Trainer(micro_config(tmp_path, eval_interval=2), data=shakespeare_slice).run(stop_at=4)
    state = latest_checkpoint(tmp_path) / training.TRAINER_STATE
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"trainer_state.pt is damaged \(RuntimeError: .*; delete step-0000004 \(and"):
        Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True)
    shutil.rmtree(state.parent)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True).step == 2  # as the message says


def test_without_a_latest_pointer_the_newest_complete_checkpoint_is_taken(tmp_path):
    root = tmp_path / "checkpoints"
    # Seven, made out of order: a directory lists them in an order of its own (sorting is tested).
    for step in (3, 10, 2, 7, 5, 12, 9):
        (root / f"step-{step:07d}").mkdir(parents=True)
        if step != 12:  # the newest was cut off before its trainer state was written
            (root / f"step-{step:07d}" / training.TRAINER_STATE).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == root / "step-0000010"
    (root / "latest").write_text("step-0000003\n")
    assert latest_checkpoint(tmp_path) == root / "step-0000003"  # a pointer, when there is one, decides


def test_a_train_config_without_fields_added_since_resumes_without_warnings(tmp_path, shakespeare_slice, caplog):
    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=4)
    config_file = latest_checkpoint(tmp_path) / training.TRAIN_CONFIG
    saved = json.loads(config_file.read_text())
    del saved["fused_loss"], saved["checkpoint_interval"]
    config_file.write_text(json.dumps(saved))
    caplog.set_level("WARNING", logger="gpt2_small.training")
    assert Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True).step == 4
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize(
    ("content", "named"), [('{"lr": 0.0', "is not valid JSON"), ("[0.001]", "holds a JSON list")], ids=["cut", "list"]
)
def test_a_damaged_train_config_is_named_on_resume(tmp_path, shakespeare_slice, content, named):
    """Before: json's JSONDecodeError naming no file, or "'list' object has no attribute 'get'"."""
    Trainer(micro_config(tmp_path), data=shakespeare_slice).run(stop_at=2)
    config_file = latest_checkpoint(tmp_path) / training.TRAIN_CONFIG
    config_file.write_text(content)
    with pytest.raises(ValueError, match=rf"step-0000002/train_config.json {named}.*; the file is damaged"):
        Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True)


def test_a_checkpoint_from_before_evaluated_at_and_sampled_at_were_kept_resumes_with_both_done(
    tmp_path, shakespeare_slice
):
    cfg = micro_config(tmp_path, sample_interval=4)  # step 4 evaluates and samples
    Trainer(cfg, data=shakespeare_slice).run(stop_at=4)
    state_file = latest_checkpoint(tmp_path) / training.TRAINER_STATE
    state = torch.load(state_file, weights_only=True)
    del state["evaluated_at"], state["sampled_at"]
    torch.save(state, state_file)
    samples = (tmp_path / "samples.txt").read_text()
    resumed = Trainer(cfg, data=shakespeare_slice, resume=True)
    assert (resumed.step, resumed.evaluated_at, resumed.sampled_at) == (4, 4, 4)
    resumed.run(stop_at=5)
    assert (tmp_path / "samples.txt").read_text() == samples  # step 4's sample is not printed again
    assert [r["step"] for r in resumed.rows if "val_loss" in r] == [4]  # nor its evaluation run again


def test_resume_without_a_checkpoint_says_so(tmp_path, shakespeare_slice):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True)


def test_a_fresh_run_refuses_an_out_dir_with_an_earlier_run_unless_overwrite(tmp_path, shakespeare_slice):
    Trainer(micro_config(tmp_path, max_steps=4, eval_interval=2), data=shakespeare_slice).run()
    with pytest.raises(FileExistsError, match=r"earlier run \(checkpoints, metrics.jsonl.*--resume.*--overwrite"):
        Trainer(micro_config(tmp_path, max_steps=2), data=shakespeare_slice)
    assert latest_checkpoint(tmp_path).name == "step-0000004"  # the refusal touched nothing

    rows = Trainer(micro_config(tmp_path, max_steps=2, overwrite=True), data=shakespeare_slice).run()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == rows and max(r["step"] for r in logged) == 2  # none of the earlier run's rows
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000002"]


def test_an_earlier_run_without_a_checkpoint_is_not_offered_to_resume(tmp_path, shakespeare_slice, monkeypatch):
    """Before: a run stopped by Ctrl-C during its first sample left metrics.jsonl and samples.txt,
    and starting again was refused with "pass --resume", which then found no checkpoint."""

    def interrupted(self, label):
        (self.out_dir / "samples.txt").write_text("--- sample, before training ---\nROM")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Trainer, "_sample", interrupted)
        Trainer(micro_config(tmp_path), data=shakespeare_slice).run()
    assert latest_checkpoint(tmp_path) is None and (tmp_path / "metrics.jsonl").exists()
    message = r"stopped before its first checkpoint \(metrics.jsonl, samples.txt\), so there is nothing to resume; pass --overwrite"
    with pytest.raises(FileExistsError, match=message):
        Trainer(micro_config(tmp_path), data=shakespeare_slice)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):  # as the message says
        Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True)
    assert Trainer(micro_config(tmp_path, max_steps=2, overwrite=True), data=shakespeare_slice).run()[-1]["step"] == 2


def test_overwrite_keeps_the_earlier_run_when_the_data_cannot_be_loaded(tmp_path, shakespeare_slice, caplog):
    """Before: --overwrite deleted the earlier run first, so a wrong --dataset cost it."""
    run = tmp_path / "run"
    Trainer(micro_config(run, max_steps=2, eval_interval=2), data=shakespeare_slice).run()
    before = sorted(p.name for p in run.rglob("*"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "cut off mid-wr')
    with pytest.raises(ValueError, match="could not read it as json"):
        Trainer(micro_config(run, overwrite=True, dataset=str(broken), cache_dir=str(tmp_path / "tokens")))
    assert sorted(p.name for p in run.rglob("*")) == before and latest_checkpoint(run) is not None
    assert "deleting" not in caplog.text


def test_evaluation_builds_no_autograd_graph(tmp_path, shakespeare_slice, monkeypatch):
    """A graph per validation batch would hold every activation of eval_batches forward passes."""
    grad_enabled = []

    def recording_loss(logits, targets):
        grad_enabled.append(torch.is_grad_enabled() or logits.requires_grad)
        return lm_loss(logits, targets)

    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    monkeypatch.setattr(training, "lm_loss", recording_loss)
    assert math.isfinite(trainer.evaluate())
    assert grad_enabled == [False, False]  # eval_batches=2


def test_a_val_split_too_small_for_a_batch_is_refused_before_training(tmp_path, shakespeare_slice, monkeypatch):
    """Before: found at the first evaluation, after the training steps it interrupted (and after
    --overwrite had deleted the earlier run)."""
    run = tmp_path / "run"
    Trainer(micro_config(run, max_steps=2, eval_interval=2), data=shakespeare_slice).run()
    before = sorted(p.name for p in run.rglob("*"))
    monkeypatch.setattr(Trainer, "train_step", lambda *a, **k: pytest.fail("trained before the val split was checked"))
    n_ctx = PRESETS["micro"].n_ctx
    for val_tokens, message in [
        (
            n_ctx,
            rf"the val split has {n_ctx} tokens, shorter than one window .*a larger val_fraction \(--val-fraction\)",
        ),
        (
            3 * n_ctx + 1,
            r"the val split gives 3 windows per process, fewer than batch_size=4; use a smaller batch_size",
        ),
    ]:
        data = TokenData(shakespeare_slice.train, shakespeare_slice.val[:val_tokens], "small-val")
        with pytest.raises(ValueError, match=message):
            Trainer(micro_config(run, overwrite=True), data=data)
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("field", ["out_dir", "cache_dir"])
def test_a_directory_that_is_a_file_is_refused_before_the_data_is_read(field, tmp_path, monkeypatch):
    """Before, for cache_dir: "[Errno 17] File exists" once the whole dataset had been tokenized."""

    def no_data(self):
        raise AssertionError(f"the data was read before {field} was checked")

    monkeypatch.setattr(Trainer, "_load_data", no_data)
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    for path, where, resume in [
        (file, "is a file", False),
        (file / "run", f"lies under {file}, which is a file", True),
    ]:
        config = micro_config(path) if field == "out_dir" else micro_config(tmp_path / "run", cache_dir=str(path))
        with pytest.raises(
            ValueError, match=rf"{field} '{re.escape(str(path))}' {re.escape(where)}; choose a directory"
        ):
            Trainer(config, resume=resume)
    assert file.read_text() == "a file" and not (tmp_path / "run").exists()


def test_ctrl_c_saves_a_checkpoint_first(tmp_path, shakespeare_slice, monkeypatch):
    trainer = Trainer(micro_config(tmp_path, eval_interval=0), data=shakespeare_slice)
    real_step = trainer.train_step

    def interrupted(**kwargs):
        if trainer.step == 5:
            raise KeyboardInterrupt
        return real_step(**kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert latest_checkpoint(tmp_path).name == "step-0000005"
    # Step 5's row, still unread when the interrupt came, was logged before the checkpoint.
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(losses(logged)) == [1, 2, 3, 4, 5]
    assert Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True).step == 5


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ctrl_c_inside_a_step_checkpoints_the_last_whole_step_and_resumes_exactly(
    tmp_path, shakespeare_slice, grad_accum
):
    """A real Ctrl-C mostly lands in the forward or backward pass, after the step drew its batches.
    Before: checkpoint step-5 counted step 6's batches as read, and the resumed run skipped them."""
    whole = Trainer(micro_config(tmp_path / "whole", grad_accum=grad_accum), data=shakespeare_slice).run()
    trainer = Trainer(micro_config(tmp_path / "split", grad_accum=grad_accum), data=shakespeare_slice)
    real_loss, calls = trainer.loss_fn, []

    def interrupted(inputs, targets):
        calls.append(trainer.step)
        if calls.count(5) == grad_accum:  # step 6's last micro-batch
            raise KeyboardInterrupt
        return real_loss(inputs, targets)

    trainer.loss_fn = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert latest_checkpoint(tmp_path / "split").name == "step-0000005"
    config = micro_config(tmp_path / "split", grad_accum=grad_accum)
    resumed = Trainer(config, data=shakespeare_slice, resume=True).run()
    assert losses(resumed) == losses(whole)  # bit-identical on CPU, steps 6 to 8 included


def test_a_run_interrupted_in_its_first_step_resumes_without_repeating_its_start(tmp_path, shakespeare_slice):
    """Before: resuming checkpoint step-0 logged the unigram baseline and printed the sample before
    training a second time."""
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    trainer = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice)

    def interrupted(inputs, targets):
        raise KeyboardInterrupt

    trainer.loss_fn = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert latest_checkpoint(tmp_path / "split").name == "step-0000000"
    resumed = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True).run()
    assert untimed(resumed) == untimed(whole)  # one unigram row
    assert (tmp_path / "split" / "samples.txt").read_text() == (tmp_path / "whole" / "samples.txt").read_text()


# Ctrl-C, and SIGTERM: a cluster's time limit or preemption, `kill`, torchrun stopping its workers.
SIGNALS = [
    pytest.param(signal.SIGINT, signal.default_int_handler, KeyboardInterrupt, id="SIGINT"),
    pytest.param(signal.SIGTERM, signal.SIG_DFL, TrainingTerminated, id="SIGTERM"),
]


def send(signum: signal.Signals, default) -> None:
    """The signal, as the terminal or a scheduler sends it; refused where run() left Python's default
    handler in place: SIGTERM's would end the test process."""
    if signal.getsignal(signum) is default:
        pytest.fail(f"run() left {signum.name} to Python's default handler")
    signal.raise_signal(signum)


@pytest.mark.parametrize(("signum", "default", "interrupt"), SIGNALS)
def test_a_signal_during_the_optimizer_step_is_held_until_the_step_is_counted(
    tmp_path, shakespeare_slice, signum, default, interrupt
):
    """Before: the KeyboardInterrupt left step 6's update in the weights of checkpoint step-5; and
    SIGTERM ended the process there, without a checkpoint."""
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    trainer = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice)
    real_step = trainer.optimizer.step

    def update_then_signal(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if trainer.step == 5:
            send(signum, default)
        return result

    trainer.optimizer.step = update_then_signal
    with pytest.raises(interrupt) as raised:
        trainer.run()
    assert type(raised.value) is interrupt
    assert latest_checkpoint(tmp_path / "split").name == "step-0000006"
    assert signal.getsignal(signum) is default  # put back
    resumed = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True).run()
    assert losses(resumed) == losses(whole)


@pytest.mark.parametrize(("signum", "default", "interrupt"), SIGNALS)
def test_a_signal_outside_the_update_interrupts_at_once(
    tmp_path, shakespeare_slice, caplog, signum, default, interrupt
):
    """Only the update itself holds a Ctrl-C or SIGTERM: one in the forward pass stops the step it is in."""
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    real_loss = trainer.loss_fn
    calls = []

    def signal_then_loss(*args, **kwargs):
        calls.append(trainer.step)
        if trainer.step == 5:
            send(signum, default)
        return real_loss(*args, **kwargs)

    trainer.loss_fn = signal_then_loss
    with caplog.at_level(logging.WARNING, logger="gpt2_small.training"), pytest.raises(interrupt) as raised:
        trainer.run()
    assert type(raised.value) is interrupt
    assert calls == [0, 1, 2, 3, 4, 5]  # step 6's forward pass (at step count 5) stopped
    assert trainer.step == 5
    assert latest_checkpoint(tmp_path).name == "step-0000005"
    how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    assert f"{how} at step 5; checkpoint saved to {latest_checkpoint(tmp_path)}" in caplog.text


def run_with_evaluation_interrupted(trainer: Trainer, step: int) -> None:
    """trainer.run(), with a Ctrl-C in the evaluation at `step`."""
    real_evaluate = trainer.evaluate

    def interrupted():
        if trainer.step == step:
            raise KeyboardInterrupt
        return real_evaluate()

    trainer.evaluate = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def untimed(rows):
    return [{k: v for k, v in row.items() if k != "tok_per_s"} for row in rows]


def test_an_evaluation_cut_short_by_ctrl_c_runs_again_on_resume(tmp_path, shakespeare_slice):
    """Before: checkpoint step-4 was written, but the val loss of step 4 was never logged."""
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    run_with_evaluation_interrupted(Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice), step=4)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000004"
    resumed = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True).run()
    assert untimed(resumed) == untimed(whole)  # the same log, row for row, the val loss of step 4 included
    assert [r["step"] for r in resumed if "val_loss" in r] == [4, 8]

    # A run resumed from a checkpoint whose evaluation did happen does not evaluate it twice.
    Trainer(micro_config(tmp_path / "again", max_steps=4), data=shakespeare_slice).run()
    again = Trainer(micro_config(tmp_path / "again", max_steps=8), data=shakespeare_slice, resume=True).run()
    assert [r["step"] for r in again if "val_loss" in r] == [4, 8]


def test_a_final_evaluation_cut_short_by_ctrl_c_runs_on_resume(tmp_path, shakespeare_slice):
    """Before: the checkpoint at max_steps was written, its val loss never logged, and --resume
    refused it: "leaves nothing to train". eval_interval=3 makes step 8 an evaluation only as the last."""
    whole = Trainer(micro_config(tmp_path / "whole", eval_interval=3), data=shakespeare_slice).run()
    split = micro_config(tmp_path / "split", eval_interval=3)
    run_with_evaluation_interrupted(Trainer(split, data=shakespeare_slice), step=8)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000008"
    assert "step 8 (end)" not in (tmp_path / "split" / "samples.txt").read_text()
    resumed = Trainer(split, data=shakespeare_slice, resume=True).run()
    assert untimed(resumed) == untimed(whole)
    assert [r["step"] for r in resumed if "val_loss" in r] == [3, 6, 8]
    assert (tmp_path / "split" / "samples.txt").read_text().count("step 8 (end)") == 1
    # Now that it is evaluated, the finished run is refused as before.
    with pytest.raises(ValueError, match="leaves nothing to train"):
        Trainer(split, data=shakespeare_slice, resume=True)


def run_interrupted_in(trainer: Trainer, method: str, step: int) -> None:
    """trainer.run(), with a Ctrl-C in trainer.<method> ("evaluate" or "_sample") at `step`."""
    real = getattr(trainer, method)

    def interrupted(*args):
        if trainer.step == step:
            raise KeyboardInterrupt
        return real(*args)

    setattr(trainer, method, interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


@pytest.mark.parametrize(
    "method, step, eval_interval",
    [("_sample", 4, 4), ("evaluate", 4, 4), ("_sample", 8, 4), ("_sample", 8, 3)],
    ids=["sample", "evaluation-before-the-sample", "end-sample", "end-sample-no-checkpoint-due"],
)
def test_a_sample_cut_short_by_ctrl_c_is_printed_on_resume(method, step, eval_interval, tmp_path, shakespeare_slice):
    """Before: the checkpoint of the step was written, and its sample never printed; at the end,
    --resume then refused the run ("leaves nothing to train"). eval_interval=3: no checkpoint is due
    at step 8 before its end sample, which must then not lose the step's checkpoint."""
    config = lambda run: micro_config(tmp_path / run, sample_interval=4, eval_interval=eval_interval)  # noqa: E731
    whole = Trainer(config("whole"), data=shakespeare_slice).run()
    run_interrupted_in(Trainer(config("split"), data=shakespeare_slice), method, step)
    assert latest_checkpoint(tmp_path / "split").name == f"step-{step:07d}"
    assert f"sample, step {step}" not in (tmp_path / "split" / "samples.txt").read_text()
    resumed = Trainer(config("split"), data=shakespeare_slice, resume=True).run()
    assert untimed(resumed) == untimed(whole)
    # Every sample once, in order, and the same text as the uninterrupted run's (the weights are).
    assert (tmp_path / "split" / "samples.txt").read_text() == (tmp_path / "whole" / "samples.txt").read_text()
    with pytest.raises(ValueError, match="leaves nothing to train"):
        Trainer(config("split"), data=shakespeare_slice, resume=True)


def test_a_second_ctrl_c_after_a_re_run_evaluation_does_not_log_it_twice(tmp_path, shakespeare_slice):
    """Before: the checkpoint at step 4 was not written again after its evaluation ran on resume,
    so the next resume evaluated step 4 once more and metrics.jsonl held two val rows for it."""
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    run_with_evaluation_interrupted(Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice), step=4)
    second = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True)
    real_forward = second.model.forward

    def step_interrupted(*args, **kwargs):
        if second.model.training:  # the first training step after the re-run evaluation
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    second.model.forward = step_interrupted
    with pytest.raises(KeyboardInterrupt):
        second.run()
    assert [r["step"] for r in second.rows if "val_loss" in r] == [4]
    resumed = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True).run()
    assert untimed(resumed) == untimed(whole)
    assert [r["step"] for r in resumed if "val_loss" in r] == [4, 8]


def test_resume_removes_what_a_killed_checkpoint_write_left(tmp_path, shakespeare_slice, caplog):
    """A SIGKILL inside save_checkpoint (a scheduler's, once SIGTERM's grace period is over) left a
    whole checkpoint under a hidden name of the dead process's id, which nothing ever removed."""
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice).run(stop_at=4)
    root = tmp_path / "split" / "checkpoints"
    shutil.copytree(root / "step-0000004", root / ".tmp-step-0000005-99999")  # killed before its rename
    shutil.copytree(root / "step-0000004", root / ".old-step-0000004-99998")  # killed after the new one's
    (root / ".tmp-step-0000006-99996").mkdir()  # killed at its first file
    with caplog.at_level(logging.WARNING, logger="gpt2_small.training"):
        resumed = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004"]
    assert (
        "removed 3 unfinished checkpoint writes: .old-step-0000004-99998, .tmp-step-0000005-99999, "
        ".tmp-step-0000006-99996" in caplog.text
    )
    assert losses(resumed.run()) == losses(whole)


def test_resume_puts_back_a_checkpoint_killed_between_its_rewrites_two_renames(tmp_path, shakespeare_slice, caplog):
    """Rewriting step-N moves it to .old-step-N-PID, then renames the new one in. A SIGKILL between
    the two left step-N only under the hidden name, with `latest` naming the missing step-N:
    --resume took an older checkpoint, or with none found no checkpoint at all."""
    whole = Trainer(micro_config(tmp_path / "whole"), data=shakespeare_slice).run()
    Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice).run(stop_at=4)
    root = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004"]
    shutil.copytree(root / "step-0000004", root / ".tmp-step-0000004-99998")  # the rewrite, never renamed
    os.replace(root / "step-0000004", root / ".old-step-0000004-99998")
    with caplog.at_level(logging.WARNING, logger="gpt2_small.training"):
        resumed = Trainer(micro_config(tmp_path / "split"), data=shakespeare_slice, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004"]
    assert "restored step-0000004 from .old-step-0000004-99998" in caplog.text
    assert "removed 1 unfinished checkpoint writes: .tmp-step-0000004-99998" in caplog.text
    assert resumed.step == 4
    assert losses(resumed.run()) == losses(whole)


@pytest.mark.parametrize(("signum", "default", "interrupt"), SIGNALS)
def test_a_signal_held_but_never_delivered_does_not_outlive_the_run(signum, default, interrupt):
    """A Ctrl-C or SIGTERM held during an update whose step then failed must not interrupt a later run()."""
    interrupts = training._Interrupts()
    with interrupts.install(), interrupts.commit():
        send(signum, default)
        assert interrupts.held is interrupt
    assert not interrupts.held and signal.getsignal(signum) is default
    interrupts.deliver()  # nothing to raise


def test_the_first_of_two_held_signals_is_the_one_delivered():
    interrupts = training._Interrupts()
    with interrupts.install():
        with interrupts.commit():
            send(signal.SIGTERM, signal.SIG_DFL)
            send(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(TrainingTerminated):
            interrupts.deliver()
        interrupts.deliver()  # delivered once


@pytest.mark.parametrize(("signum", "default", "interrupt"), SIGNALS)
def test_run_leaves_a_callers_own_handler_in_place(tmp_path, shakespeare_slice, signum, default, interrupt):
    def callers_handler(signum, frame):
        pass

    trainer = Trainer(micro_config(tmp_path, max_steps=2, eval_interval=0), data=shakespeare_slice)
    real_step, seen = trainer.train_step, []

    def step(**kwargs):
        seen.append((signal.getsignal(signum), signal.getsignal(({signal.SIGINT, signal.SIGTERM} - {signum}).pop())))
        return real_step(**kwargs)

    trainer.train_step = step
    previous = signal.signal(signum, callers_handler)
    try:
        trainer.run()
        assert signal.getsignal(signum) is callers_handler
    finally:
        signal.signal(signum, previous)
    other = trainer._interrupts._handler  # the other signal is still handled by run()
    assert [mine for mine, _ in seen] == [callers_handler, callers_handler]
    assert all(theirs == other for _, theirs in seen)


@pytest.mark.parametrize("broken", ["weights", "gradients"])
def test_divergence_stops_training_before_a_checkpoint_of_the_broken_weights(tmp_path, shakespeare_slice, broken):
    cfg = micro_config(tmp_path, max_steps=8, eval_interval=4)  # without the check, step 4 would be checkpointed
    Trainer(cfg, data=shakespeare_slice).run(stop_at=3)
    trainer = Trainer(cfg, data=shakespeare_slice, resume=True)
    ln_w = trainer.model.blocks[0].ln1.w
    if broken == "weights":  # step 4's loss is NaN
        with torch.no_grad():
            ln_w[0] = float("nan")
    else:  # step 4's loss is finite, its gradient infinite
        ln_w.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    with pytest.raises(NonFiniteLossError, match=r"step 4: loss .*step-0000003, is intact.*--resume") as error:
        trainer.run()
    assert ("loss nan" in str(error.value)) == (broken == "weights")
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000003"]
    saved = Transformer.load(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line, parse_constant=pytest.fail) for line in lines]  # strict JSON: NaN written as null
    assert max(losses(logged)) == 4  # the bad step is logged, nothing after it ran
    assert (logged[-1]["loss"] is None) == (broken == "weights") and logged[-1]["grad_norm"] is None

    resumed = Trainer(cfg, data=shakespeare_slice, resume=True).run()  # from step 3, undamaged
    assert all(math.isfinite(r["loss"]) for r in resumed if "loss" in r) and max(losses(resumed)) == 8


def test_divergence_before_any_checkpoint_says_to_start_again(tmp_path, shakespeare_slice):
    trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice)
    trainer.model.unembed.b_U.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    with pytest.raises(
        NonFiniteLossError, match=r"step 1: .*gradient norm nan.*No checkpoint was written yet.*--overwrite"
    ):
        trainer.run()
    assert latest_checkpoint(tmp_path) is None
    assert (tmp_path / "loss_curve.png").is_file()  # drawn up to the bad step, before any evaluation


def test_each_steps_loss_is_read_only_after_the_next_step_is_queued(tmp_path, shakespeare_slice, monkeypatch):
    """Reading a loss waits for the device; the run reads step k's after queuing step k + 1 (so a
    GPU always has the next step to work on), except before an evaluation and at the end."""
    trainer = Trainer(micro_config(tmp_path, max_steps=6, eval_interval=3), data=shakespeare_slice)
    events = []
    real_step, real_eval, real_finish = trainer.train_step, trainer.evaluate, training.finish_row

    def step(**kwargs):
        row = real_step(**kwargs)
        assert isinstance(row["loss"], torch.Tensor) and isinstance(row["grad_norm"], torch.Tensor)
        events.append(f"queue {row['step']}")
        return row

    def finish(row):
        events.append(f"read {row['step']}")
        return real_finish(row)

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "evaluate", lambda: events.append("eval") or real_eval())
    monkeypatch.setattr(training, "finish_row", finish)
    rows = trainer.run()
    assert events == ["queue 1", "queue 2", "read 1", "queue 3", "read 2", "read 3", "eval",
                      "queue 4", "queue 5", "read 4", "queue 6", "read 5", "read 6", "eval"]  # fmt: skip
    assert sorted(losses(rows)) == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(r["loss"], float) and r["tok_per_s"] > 0 for r in rows if "loss" in r)


# --- distributed ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, world_size, port):
    """A spawned worker's setup: torchrun's environment for this rank, one thread, the micro preset."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    PRESETS["micro"] = MICRO


def _ddp_worker(rank, world_size, port, data, inputs, targets, out_dir, tie_embeddings):
    _as_rank(rank, world_size, port)
    trainer = Trainer(micro_config(out_dir, tie_embeddings=tie_embeddings), data=data)
    assert isinstance(trainer.train_model, torch.nn.parallel.DistributedDataParallel)
    half = inputs.shape[0] // world_size
    rows = slice(rank * half, (rank + 1) * half)
    loss = trainer.forward_backward([(inputs[rows], targets[rows])])
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    grads["loss over ranks"] = trainer.dist.mean_over_ranks(loss)  # what the step logs
    grads["own loss"] = loss  # which mean_over_ranks must leave as it was: its all_reduce works in place
    grads["val loss"] = torch.tensor(trainer.evaluate())
    torch.save(grads, Path(out_dir) / f"grads-{rank}.pt")
    torch.distributed.destroy_process_group()


def _train_worker(rank, world_size, port, data, out_dir, steps):
    _as_rank(rank, world_size, port)
    Trainer(micro_config(out_dir), data=data).run(stop_at=steps)
    torch.distributed.destroy_process_group()


def _resume_worker(rank, world_size, port, data, out_dir):
    _as_rank(rank, world_size, port)
    put_back = Trainer._remove_unfinished_writes

    def slow_put_back(self):  # rank 1 would look for the newest checkpoint meanwhile, were it not held
        time.sleep(2)
        put_back(self)

    Trainer._remove_unfinished_writes = slow_put_back
    trainer = Trainer(micro_config(out_dir), data=data, resume=True)
    Path(out_dir, f"rank-{rank}").write_text(str(trainer.step))
    torch.distributed.destroy_process_group()


def _wrapper_worker(rank, world_size, port, data, out_dir):
    _as_rank(rank, world_size, port)
    kept = Trainer(micro_config(Path(out_dir) / "kept"), data=data)
    dropped = Trainer(micro_config(Path(out_dir) / "dropped"), data=data)
    wrappers = [weakref.ref(kept.train_model), weakref.ref(dropped.train_model)]
    dropped.run(stop_at=1)
    del dropped  # as when a script's main() returns
    alive = [w() is not None for w in wrappers]
    atexit._run_exitfuncs()
    Path(out_dir, f"rank-{rank}").write_text(f"{alive} {[w() is not None for w in wrappers]}")


def _exit_worker(rank, world_size, port, out_dir):
    _as_rank(rank, world_size, port)
    training.init_distributed("cpu")
    joined = torch.distributed.is_initialized()
    atexit._run_exitfuncs()  # what interpreter exit runs before it tears the interpreter down
    Path(out_dir, f"rank-{rank}").write_text(f"{joined} {torch.distributed.is_initialized()}")


def test_at_exit_no_ddp_wrapper_outlives_the_process_group(tmp_path, shakespeare_slice):
    """Each DDP wrapper holds the process group, which then outlived destroy_process_group into
    interpreter finalization, where Gloo may abort the rank (SIGABRT; torchrun reports the run
    failed): a Trainer still held by the script, and one out of scope but in a reference cycle."""
    mp.spawn(_wrapper_worker, args=(2, _free_port(), shakespeare_slice, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in range(2)] == ["[True, True] [False, False]"] * 2


def test_the_process_group_is_destroyed_at_exit(tmp_path):
    """Left to interpreter finalization, Gloo aborted a rank after its work ("terminate called
    without an active exception"; torchrun then reported failure): once in the torchrun test below."""
    mp.spawn(_exit_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in range(2)] == ["True False"] * 2


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
def test_ddp_gloo_gradients_equal_one_process_on_the_whole_batch(tie_embeddings, tmp_path, shakespeare_slice):
    """And the loss the step logs, the mean over ranks, is the whole batch's loss; the validation
    loss every rank reports is the mean over both ranks' shards, not its own shard's."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 50257, (4, MICRO.n_ctx), generator=gen)
    targets = torch.randint(0, 50257, (4, MICRO.n_ctx), generator=gen)
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), shakespeare_slice, inputs, targets, str(tmp_path), tie_embeddings),
        nprocs=2,
        join=True,
    )
    single = Trainer(micro_config(tmp_path / "single", tie_embeddings=tie_embeddings), data=shakespeare_slice)
    loss = single.forward_backward([(inputs, targets)])
    assert single.dist.mean_over_ranks(loss) is loss  # one process: nothing to average
    cfg = single.cfg
    with torch.no_grad():
        shard_losses = [
            torch.stack([
                lm_loss(single.model(inputs), targets)
                for inputs, targets in itertools.islice(
                    shakespeare_slice.loader("val", n_ctx=MICRO.n_ctx, batch_size=cfg.batch_size, rank=rank,
                                             world_size=2),
                    cfg.eval_batches,
                )
            ]).mean()
            for rank in range(2)
        ]  # fmt: skip
    # Far above the rtol below (1e-6 of ~10.8), else a rank's own shard's loss would pass for the mean
    assert abs(shard_losses[0] - shard_losses[1]) > 1e-4
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads-{rank}.pt", weights_only=True)
        torch.testing.assert_close(grads.pop("loss over ranks"), loss, rtol=1e-6, atol=0, msg=f"rank {rank} loss")
        half = len(inputs) // 2  # the worker's shard
        rows = slice(rank * half, (rank + 1) * half)
        with torch.no_grad():
            own = lm_loss(single.model(inputs[rows]), targets[rows])
        torch.testing.assert_close(grads.pop("own loss"), own, rtol=1e-5, atol=0, msg=f"rank {rank} own loss")
        torch.testing.assert_close(
            grads.pop("val loss"), torch.stack(shard_losses).mean(), rtol=1e-6, atol=0, msg=f"rank {rank} val loss"
        )
        for name, p in single.model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")


def test_a_two_process_checkpoint_resumed_by_one_process_keeps_its_place_in_the_epoch(
    tmp_path, shakespeare_slice, caplog
):
    """Each of 2 processes consumed 3 steps x 4 windows of the epoch; one process takes up all 24
    of them, not its 12 (which would see 12 windows of the epoch a second time), and says the
    data order now differs from an uninterrupted run."""
    mp.spawn(_train_worker, args=(2, _free_port(), shakespeare_slice, str(tmp_path), 3), nprocs=2, join=True)
    state = torch.load(latest_checkpoint(tmp_path) / training.TRAINER_STATE, weights_only=True)
    assert (state["world_size"], state["position"]) == (2, {"epoch": 0, "consumed": 12})
    with caplog.at_level("WARNING", logger="gpt2_small.training"):
        trainer = Trainer(micro_config(tmp_path), data=shakespeare_slice, resume=True)
    assert (trainer.step, trainer.position.epoch, trainer.position.consumed) == (3, 0, 24)
    assert "resuming a 2-process run with 1 processes: the data order differs" in caplog.text
    assert len(trainer.run()) > 0 and trainer.step == 8


def test_two_processes_resume_from_the_checkpoint_rank_0_puts_back(tmp_path, shakespeare_slice):
    """Rank 1 looks for the newest checkpoint only once rank 0 has put back the one a killed rewrite
    left under its .old-* name; before, it found none, or an older one than rank 0's."""
    mp.spawn(_train_worker, args=(2, _free_port(), shakespeare_slice, str(tmp_path), 3), nprocs=2, join=True)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000003"]
    os.replace(root / "step-0000003", root / ".old-step-0000003-99998")
    mp.spawn(_resume_worker, args=(2, _free_port(), shakespeare_slice, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in range(2)] == ["3", "3"]


@pytest.mark.slow
def test_torchrun_two_process_training_completes(tmp_path):
    # TMPDIR: torchrun makes a torchelastic_* log folder there and leaves it behind.
    (tmp_path / "tmp").mkdir()
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "GPT2_SMALL_CACHE": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
        str(REPO / "demos" / "train_demo.py"), "--max-steps", "3", "--batch-size", "2", "--eval-interval", "0",
        "--eval-batches", "1", "--sample-tokens", "2", "--warmup-steps", "1", "--out-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # rank 0 alone logged
    assert rows[1]["tokens"] == 2 * 2 * 128  # batch 2 x n_ctx 128 x 2 processes
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"
