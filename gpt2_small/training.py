"""Train a `solution.Transformer` on a text dataset, from a laptop CPU to a multi-GPU node.

    trainer = Trainer(TrainConfig(preset="tiny", max_steps=600))
    trainer.run()

Everything a run produces goes to `out_dir`: checkpoints/step-*/ (model safetensors + config,
optimizer, step, RNG states, data position, train config; written to a temporary directory
and renamed, with a `latest` pointer), metrics.jsonl (one row per step and per evaluation),
loss_curve.png (redrawn at every evaluation) and samples.txt.

Resuming (`resume=True`) restores all of it, so a run stopped at step k continues with the same
losses an uninterrupted run would have had. Ctrl-C and SIGTERM save a checkpoint of the last
whole step before exiting (see _Interrupts and train_step). A NaN or infinite loss or gradient
norm stops the run (NonFiniteLossError) before the damaged weights are checkpointed, so the
newest checkpoint stays one to resume from.

Under `torchrun --nproc_per_node=N`, the model is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on CPUs); each process reads its own shard of every epoch, and only rank 0 logs,
plots and checkpoints.
"""

import atexit
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import typing
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import einops
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gpt2_small.data import EMBEDDED_DATASET, TokenData, check_directory_path, default_cache_dir
from gpt2_small.sampling import check_seed, generate
from gpt2_small.tokenizer import get_tokenizer, to_tokens
from solution import (
    IGNORE_INDEX,
    Transformer,
    TransformerConfig,
    Unembedding,
    _read_json,
    check_device,
    check_flag,
    user_path,
)

logger = logging.getLogger(__name__)

# GPT-2's 50,257 tokens rounded up to a multiple of 64. An odd vocabulary leaves the unembedding's
# matrices misaligned and GPUs fall back to slow GEMM kernels (about 1.4x slower steps on an
# H100). Ids 50257..50303 never occur in data; their logits learn to be very negative, and
# sampling masks them.
PADDED_VOCAB = 50304
PRESETS: dict[str, TransformerConfig] = {
    # Small enough to train in minutes on 2 CPU cores; the vocabulary dominates its size.
    "tiny": TransformerConfig(
        d_model=128, n_layers=4, n_heads=4, d_head=32, d_mlp=512, d_vocab=PADDED_VOCAB, n_ctx=128
    ),
    # GPT-2 small's shape: 124M parameters with tied embeddings, 163M as here (untied, padded).
    "gpt2": TransformerConfig(d_vocab=PADDED_VOCAB),
}
# Peak and floor learning rates when TrainConfig.lr is not given. tiny: the README's sweep on
# Shakespeare (3e-3 spiked the gradient norm); gpt2: GPT-3's 125M model and nanoGPT's 6e-4.
PRESET_LR: dict[str, tuple[float, float]] = {"tiny": (1.5e-3, 1.5e-4), "gpt2": (6e-4, 6e-5)}
# tie_embeddings and unembed_bias when TrainConfig leaves them None. gpt2 trains GPT-2's own
# parameterisation, as OpenAI and nanoGPT trained it: one tied embedding matrix and no b_U (124M
# trained parameters; export_hf writes it as GPT-2's files are). tiny, and any preset not named
# here, trains TransformerLens's: W_U and b_U parameters of their own (on Shakespeare at tiny's
# tuned lr, untied ended lower, 5.539 against 5.584).
PRESET_UNEMBEDDING: dict[str, dict[str, bool]] = {"gpt2": {"tie_embeddings": True, "unembed_bias": False}}
UNEMBEDDING_DEFAULTS = {"tie_embeddings": False, "unembed_bias": True}


def preset_unembedding(preset: str) -> dict[str, bool]:
    """tie_embeddings and unembed_bias as `preset` trains them when TrainConfig leaves them None."""
    return UNEMBEDDING_DEFAULTS | PRESET_UNEMBEDDING.get(preset, {})


CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
RUN_FILES = ("metrics.jsonl", "samples.txt", "loss_curve.png")
# TrainConfig fields that leave the training trajectory alone: a resumed run may change them freely.
_OUTSIDE_TRAJECTORY = {
    "out_dir", "overwrite", "eval_interval", "eval_batches", "sample_interval", "sample_prompt",
    "sample_tokens", "keep_checkpoints", "checkpoint_interval", "num_proc", "cache_dir",
}  # fmt: skip


# TrainConfig's fields that name a file or directory: a str, or an os.PathLike that __post_init__
# turns into its str (train_config.json holds the config, and json takes no Path).
_PATH_FIELDS = ("dataset", "cache_dir", "out_dir")
_KIND_NAMES = {bool: "True or False", int: "an int", float: "a number", str: "a str"}


@dataclass
class TrainConfig:
    """Everything about a training run; the defaults train the tiny model on Shakespeare on a CPU."""

    # model
    preset: str = "tiny"  # a key of PRESETS: "tiny" (CPU-sized) or "gpt2" (124M)
    # None: the preset's (PRESET_UNEMBEDDING): True for gpt2 (GPT-2's own form), False for tiny.
    tie_embeddings: bool | None = None  # W_U = W_E^T, one trained matrix, as in GPT-2 and nanoGPT (see tie_embeddings)
    # None: the preset's: False for gpt2, True for tiny. False keeps b_U 0, as GPT-2 has none (export_hf needs that).
    unembed_bias: bool | None = None  # train unembed.b_U
    # data
    dataset: str | os.PathLike = EMBEDDED_DATASET  # "shakespeare", a hub id, or a .txt/.jsonl/.csv/.parquet path
    text_column: str = "text"  # the column holding the documents
    split: str = "train"  # which split of the source dataset to read
    config_name: str | None = None  # the hub dataset's configuration, if it has several
    max_examples: int | None = None  # read only the first N documents
    val_fraction: float = 0.1  # the last fraction of the token stream is held out for validation
    stride: int | None = None  # window stride in tokens; None = n_ctx (no overlap), smaller overlaps
    num_proc: int | None = None  # tokenizer processes for datasets.map; None picks by dataset size
    cache_dir: str | os.PathLike | None = None  # token cache; None = ~/.cache/gpt2_small/tokens (or $GPT2_SMALL_CACHE)
    # optimisation
    batch_size: int = 4  # sequences per micro-batch, per process (16+ on a GPU)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate, reached after warmup; None: the preset's (PRESET_LR)
    min_lr: float | None = None  # the floor the cosine decays to; None: the preset's with its lr, else lr / 10
    warmup_steps: int = 30  # linear warmup from lr / warmup_steps to lr
    max_steps: int = 400  # optimizer steps; ignored when epochs is set
    epochs: float | None = None  # train for this many passes over the training windows instead
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    weight_decay: float = 0.1  # on weight matrices (every W_* parameter, embeddings included) only
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # evaluation and samples
    eval_interval: int = 100  # steps between validation runs (and loss-curve redraws); 0 = only at the end
    eval_batches: int = 20  # validation batches per evaluation (all of the split, if it has fewer)
    sample_interval: int = 200  # steps between printed samples; 0 = only before and after training
    sample_prompt: str = "ROMEO:"  # the prompt the samples continue
    sample_tokens: int = 48  # new tokens per sample
    # runtime
    seed: int = 1337  # model init, data order and sampling all derive from it
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, float32 elsewhere; or "float32" / "bfloat16"
    compile: bool = False  # torch.compile the model (worth it on GPUs, slow to start on CPUs)
    fused_loss: bool = True  # unembedding + cross-entropy without storing the logits (unembed_lm_loss); False: lm_loss
    out_dir: str | os.PathLike = "runs/train_demo"  # checkpoints, metrics, plots and samples go here
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run, deleting that run
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = at every evaluation and at the end

    def __post_init__(self) -> None:
        self._check_types()
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in _PATH_FIELDS:  # Path("") is the working directory: it was read or written silently
            if getattr(self, name) == "":
                what = f"{EMBEDDED_DATASET!r}, a hub dataset or a local path" if name == "dataset" else "a directory"
                raise ValueError(f"{name} is empty; name {what} ('.' for the working directory)")
        for name, default in preset_unembedding(self.preset).items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True, False or None (the preset's), got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "sample_tokens", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "eval_interval",
            "sample_interval",
            "checkpoint_interval",
            "grad_clip",
            "weight_decay",
        ):
            if not 0 <= getattr(self, name) < math.inf:  # NaN too: it would reach the weights at the first step
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr is not None and not 0 < self.lr < math.inf:  # named alone: min_lr may only follow from it
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.lr is None:
            if self.preset not in PRESET_LR:
                raise ValueError(f"preset {self.preset!r} has no default learning rate in PRESET_LR; pass lr")
            self.lr, preset_min_lr = PRESET_LR[self.preset]
            self.min_lr = preset_min_lr if self.min_lr is None else self.min_lr
        elif self.min_lr is None:
            self.min_lr = self.lr / 10
        if not 0 < self.min_lr <= self.lr < math.inf:
            raise ValueError(f"need 0 < min_lr <= lr, both finite, got min_lr={self.min_lr}, lr={self.lr}")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")
        check_seed(self.seed)  # else torch's "Overflow when unpacking long long", once the data has loaded
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        # The data's own checks would only run after a hub dataset is downloaded and tokenized.
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("stride", "max_examples", "num_proc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")

    def _check_types(self) -> None:
        """Each field of its annotated type, before the range checks compare it; a path as its str
        and a numpy int as an int, which train_config.json can hold (json refuses both, and a
        PosixPath out_dir once failed the first checkpoint, after the steps before it had run)."""
        hints = typing.get_type_hints(TrainConfig)
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name in ("tie_embeddings", "unembed_bias"):
                continue  # checked with the preset's defaults in __post_init__
            kinds = typing.get_args(hints[name]) or (hints[name],)  # X | None -> (X, NoneType)
            if value is None and type(None) in kinds:
                continue
            base = next(kind for kind in kinds if kind is not type(None))
            if name in _PATH_FIELDS and isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif base is int and isinstance(value, np.integer):
                value = int(value)
            elif base is float and isinstance(value, np.floating | np.integer):
                value = float(value)
            setattr(self, name, value)
            if base is bool:
                ok = isinstance(value, bool)
            else:
                ok = not isinstance(value, bool) and isinstance(value, (int, float) if base is float else base)
            if not ok:
                what = "a str or a path" if name in _PATH_FIELDS else _KIND_NAMES[base]
                raise TypeError(f"{name} must be {what}{' or None' if type(None) in kinds else ''}, got {value!r}")

    @property
    def model_config(self) -> TransformerConfig:
        return PRESETS[self.preset]


# --- pieces that tests exercise on their own ---------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_parameters_contiguous(model: Transformer) -> None:
    """Give every parameter of `model` a contiguous layout of its own, in place (for a CPU run).

    solution.py stores W_Q, W_K, W_V d_model-major and W_U vocab-major, as transposed views, for
    the sake of GPU matrix multiplies. A CPU's run about as fast on either layout (measured), but
    aten's CPU fused AdamW copies every non-contiguous gradient before updating its parameter
    (torch 2.13): on 2 cores that took GPT-2 small's optimizer step from 78 to 230 ms, and the
    tiny preset's from 8 to 31 ms, nearly a tenth of its training step.
    """
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_contiguous():
                param.data = param.data.contiguous()


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Lay out each optimizer state tensor (AdamW's moments) as its parameter is laid out.

    Fused AdamW walks a parameter, its gradient and its moments as flat memory, element i of
    each together. A checkpoint written where the parameters had another layout (a GPU run, see
    make_parameters_contiguous) holds moments in that layout: aten's CUDA kernel refuses them,
    and its CPU kernel, which does not check, would pair each weight with another's moments.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def tie_embeddings(model: Transformer) -> None:
    """Make unembed.W_U a view of embed.W_E's memory, W_U = W_E^T, for training them as one matrix.

    GPT-2 was trained so, as nanoGPT trains: 124M parameters for GPT-2 small's shape where
    untied has 163M. The model keeps both parameters (its state dict, hooks and every analysis
    are unchanged), and a saved checkpoint holds W_U as a copy equal to W_E^T, so it loads
    as any model does. Training must then treat the two as one: `fold_tied_gradient` adds W_U's
    gradient into W_E's before each update, and the optimizer updates W_E alone (param_groups
    with exclude={"unembed.W_U"}), which moves W_U with it.
    """
    with torch.no_grad():
        model.unembed.W_U.data = model.embed.W_E.data.T


def embeddings_tied(model: Transformer) -> bool:
    """Whether W_U is a view of W_E's memory (tie_embeddings), not merely equal to W_E^T."""
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    return W_U.data_ptr() == W_E.data_ptr() and W_U.stride() == W_E.T.stride() and W_U.shape == W_E.T.shape


def fold_tied_gradient(model: Transformer) -> None:
    """For tied embeddings: W_E's gradient becomes the whole matrix's, W_E's part plus W_U's.

    Run after backward (and DDP's averaging) and before clipping, which then sees the tied
    matrix's gradient once. W_U's gradient is laid out as W_U, a view of W_E, so its transpose
    adds element for element.
    """
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    if W_U.grad is None:
        return
    if W_E.grad is None:
        W_E.grad = W_U.grad.T.clone(memory_format=torch.contiguous_format)
    else:
        W_E.grad.add_(W_U.grad.T)
    W_U.grad = None


def param_groups(model: Transformer, weight_decay: float, *, exclude: Collection[str] = ()) -> list[dict]:
    """AdamW groups: weight decay on the weight matrices (W_*), none on biases and LayerNorm.

    The embeddings (W_E, W_pos) and the unembedding (W_U) are weight matrices and decay, as in
    GPT-2 and nanoGPT. Parameters named in `exclude` (a tied W_U) are left out.
    """
    unknown = set(exclude) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"exclude names {sorted(unknown)}, which are not parameters of the model")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and name not in exclude:
            (decay if name.rsplit(".", 1)[-1].startswith("W_") else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def lm_loss(logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy, computed in float32, over the targets that are not
    IGNORE_INDEX (-100, F.cross_entropy's ignore_index); NaN if every one is."""
    return F.cross_entropy(
        einops.rearrange(logits.float(), "batch pos d_vocab -> (batch pos) d_vocab"),
        einops.rearrange(targets, "batch pos -> (batch pos)"),
    )


def unembed_lm_loss(
    resid_normalized: Float[Tensor, "batch pos d_model"],
    unembed: Unembedding,
    targets: Int[Tensor, "batch pos"],
    chunk_rows: int | None = None,
) -> Float[Tensor, ""]:
    """lm_loss(unembed(resid_normalized), targets), without keeping the logits.

    The standard path stores the [batch pos d_vocab] logits for the backward pass and reads them
    again there to get the softmax; for the tiny preset that traffic over 50,304 logits per
    position is about a fifth of a CPU training step. Here, when gradients are wanted, the
    forward pass works through chunk_rows positions at a time: logits, log-sum-exp, loss, and
    at once the gradient softmax - onehot and its products with W_U and the inputs; the backward
    pass only scales those by the incoming gradient. Same value and gradients as lm_loss
    (tested), IGNORE_INDEX targets left out as there, with the softmax in float32 also under
    bf16 autocast. chunk_rows=None bounds the float32 softmax chunk at 2**26 values (256 MiB).

    Under torch.compile the saving is lost: the graph partitioner moves the gradient products
    (which the loss itself does not need) into the backward graph and keeps the [positions d_vocab]
    softmax - onehot for them, as much as the plain path keeps.
    """
    if not (torch.is_grad_enabled() and (resid_normalized.requires_grad or unembed.W_U.requires_grad)):
        return lm_loss(unembed(resid_normalized), targets)
    if chunk_rows is None:
        chunk_rows = max(1, 2**26 // unembed.cfg.d_vocab)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _UnembedCrossEntropy.apply(
        einops.rearrange(resid_normalized, "batch pos d_model -> (batch pos) d_model"),
        unembed.W_U,
        unembed.b_U,
        einops.rearrange(targets, "batch pos -> (batch pos)"),
        chunk_rows,
    )


class _UnembedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x W_U + b_U against targets; the gradients are computed in forward."""

    @staticmethod
    def forward(ctx, x: Tensor, W_U: Tensor, b_U: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        rows = x.shape[0]
        with torch.autocast(device_type, enabled=False):
            x_c, W, b = x.to(dtype), W_U.to(dtype), b_U.float()
            grad_x = torch.empty_like(x_c)
            # Vocab-major, like the W_U parameter's own storage, so autograd keeps it as is.
            grad_W = torch.zeros(W.shape[1], W.shape[0], dtype=torch.float32, device=x.device)
            grad_b = torch.zeros(W.shape[1], dtype=torch.float32, device=x.device)
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            # IGNORE_INDEX targets count for nothing, as in lm_loss (F.cross_entropy): the mean is over
            # the others. Their rows are weighted 0 where the tensors are [rows] or [rows d_model]
            # (the loss, x before grad_W's product, grad_x), never in a [rows d_vocab] pass.
            kept = targets != IGNORE_INDEX
            for start in range(0, rows, chunk_rows):
                rows_c = slice(start, start + chunk_rows)
                weight = kept[rows_c].float()
                target = einops.rearrange(torch.where(kept[rows_c], targets[rows_c], 0), "rows -> rows 1")
                # As the model's forward computes them: the product in the compute dtype, + b_U in float32.
                logits = (x_c[rows_c] @ W).float().add_(b)
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
                loss += weight @ (log_norm - logits.gather(1, target)).squeeze(1)
                probs = logits.sub_(log_norm).exp_()  # in place: the logits are not needed again
                grad_logits = probs.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=probs.dtype))
                grad_b += weight @ grad_logits
                grad_logits = grad_logits.to(dtype)
                row_weight = einops.rearrange(weight.to(dtype), "rows -> rows 1")
                grad_x[rows_c] = (grad_logits @ W.T).mul_(row_weight)
                x_kept = x_c[rows_c] * row_weight
                if dtype == torch.float32:
                    grad_W.addmm_(grad_logits.T, x_kept)
                else:  # accumulate the low-precision products in float32
                    grad_W += grad_logits.T @ x_kept
            count = kept.sum()  # a tensor: no wait for the device; none kept gives NaN, as lm_loss
        ctx.save_for_backward(grad_x.div_(count), grad_W.div_(count), grad_b.div_(count))
        ctx.dtypes = (x.dtype, W_U.dtype, b_U.dtype)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_x, grad_W, grad_b = ctx.saved_tensors
        x_dtype, W_dtype, b_dtype = ctx.dtypes
        return (
            (grad_x * grad_loss).to(x_dtype),
            (grad_W * grad_loss).to(W_dtype).T,
            (grad_b * grad_loss).to(b_dtype),
            None,
            None,
        )


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    if requested != "auto":
        return check_device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean_over_ranks(self, value: Tensor) -> Tensor:
        """The mean of a scalar tensor over all processes (itself in a single process).

        A sum divided by world_size, not ReduceOp.AVG: Gloo (the CPU backend) refuses AVG in
        older torch releases ("Cannot use ReduceOp.AVG with Gloo" in torch 2.6).
        """
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(_leave_process_group)
    return info


# The Trainers that wrapped their model in DDP, whose wrapper holds the process group.
_DDP_TRAINERS: "weakref.WeakSet[Trainer]" = weakref.WeakSet()


def _leave_process_group() -> None:
    """Destroy the process group init_distributed joined, at exit while the interpreter is whole.

    Left to interpreter finalization, Gloo's worker threads may still hold tensors whose release
    then needs the GIL of a dying interpreter: the process aborts ("terminate called without an
    active exception", SIGABRT) after its work is done, and torchrun reports the run as failed
    (pytorch/pytorch#179291). destroy_process_group drops only torch's own references to the group;
    a Trainer's DDP wrapper holds another. So each Trainer still alive lets go of its wrapper, and
    the garbage collector frees those out of scope, which sit in reference cycles. Before, rank 1,
    done while rank 0 still sampled and saved, aborted in 1 of 20 runs of the torchrun test, and in 3
    of 10 with a 100-token final sample.
    """
    for trainer in list(_DDP_TRAINERS):
        trainer.train_model = trainer.model
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def sample_text(
    model: Transformer, prompt: str, max_new_tokens: int, *, temperature: float = 0.8, top_k: int = 40, seed: int = 0
) -> str:
    """Continue `prompt` (after <|endoftext|>) with gpt2_small.sampling.generate: the training-time samples."""
    was_training = model.training
    model.eval()
    tokens = to_tokens(prompt, prepend_bos=True, device=model.device)
    out = generate(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, stop_at_eos=False)
    model.train(was_training)
    return get_tokenizer().decode(out[0, 1:].tolist())


def plot_loss_curve(rows: list[dict], path: Path) -> None:
    """Train loss (raw and smoothed) and validation loss against tokens seen, as a PNG."""
    # A bare Figure, not pyplot: matplotlib.use("Agg") here switched the backend of the whole
    # process, and a notebook that trained then drew no more inline plots.
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    if train:
        x, y = zip(*train, strict=True)
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        smooth, ema = [], y[0]
        for value in y:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax.plot(x, smooth, color="tab:blue", linewidth=1.8, label="train (EMA 0.9)")
    if val:
        x, y = zip(*val, strict=True)
        ax.plot(x, y, "o-", color="tab:orange", linewidth=1.8, label="validation")
    unigram = next((r["unigram_val_loss"] for r in rows if "unigram_val_loss" in r), None)
    if unigram is not None:
        ax.axhline(unigram, color="gray", linestyle="--", linewidth=1, label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("gpt2-small training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


# --- the trainer -------------------------------------------------------------------------------


@dataclass
class DataPosition:
    """Where the training stream is: the epoch, and the samples this process consumed within it."""

    epoch: int = 0
    consumed: int = 0


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another model configuration than this run's."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a step's loss or gradient norm is NaN or infinite."""


class TrainingTerminated(KeyboardInterrupt):
    """SIGTERM arrived during Trainer.run(): a cluster's time limit or preemption, `kill`, or
    torchrun shutting its workers down. Handled as Ctrl-C is, a checkpoint first; a KeyboardInterrupt,
    so that `except Exception` does not swallow it either."""


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM during Trainer.run(): a KeyboardInterrupt (TrainingTerminated
    for SIGTERM) at once, except while a step commits its update (optimizer.step() and the step
    count). One arriving then is held, and run() raises it once that step's row is queued for the log.

    Without the hold, a Ctrl-C inside optimizer.step() (one update per parameter group) or just
    after it left the weights a step ahead of the step count the checkpoint recorded. Without the
    SIGTERM handler, Python's default ends the process at once, and every step since the last
    checkpoint is lost. Only the main thread receives signals, and a signal's handler is replaced
    only while it is Python's default: under another one (a notebook's, a caller's) run() leaves
    that signal alone.
    """

    # Each signal, the handler Python starts with, and what it raises here.
    SIGNALS = {
        signal.SIGINT: (signal.default_int_handler, KeyboardInterrupt),
        signal.SIGTERM: (signal.SIG_DFL, TrainingTerminated),
    }

    def __init__(self) -> None:
        self.committing = False
        self.held: type[KeyboardInterrupt] | None = None

    def _handler(self, signum: int, frame: object) -> None:
        interrupt = self.SIGNALS[signal.Signals(signum)][1]
        if not self.committing:
            raise interrupt
        self.held = self.held or interrupt

    @contextlib.contextmanager
    def install(self) -> Iterator[None]:
        replaced = []
        if threading.current_thread() is threading.main_thread():
            replaced = [sig for sig, (default, _) in self.SIGNALS.items() if signal.getsignal(sig) is default]
        for sig in replaced:
            signal.signal(sig, self._handler)
        try:
            yield
        finally:
            for sig in replaced:
                signal.signal(sig, self.SIGNALS[sig][0])
            self.held = None

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        self.committing = True
        try:
            yield
        finally:
            self.committing = False

    def deliver(self) -> None:
        """Raise the Ctrl-C or SIGTERM held during the last commit, if one came."""
        if self.held:
            interrupt, self.held = self.held, None
            raise interrupt


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, data: TokenData | None = None):
        # Before anything: resume="no" was truthy and resumed, and the others failed later on an attribute.
        if not isinstance(cfg, TrainConfig):
            hint = "; build one with TrainConfig(**settings)" if isinstance(cfg, dict) else ""
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}{hint}")
        check_flag("resume", resume)
        if data is not None and not isinstance(data, TokenData):
            raise TypeError(
                f"data must be a TokenData (TokenData.load(...)) or None, got {type(data).__name__}; "
                f"to train on a dataset by name, set TrainConfig's dataset"
            )
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir).expanduser()
        requested = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
        self.dist = init_distributed(pick_device(requested).type)
        self.device = pick_device(cfg.device, self.dist.local_rank)
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        n_ctx = cfg.model_config.n_ctx
        prompt_len = to_tokens(cfg.sample_prompt, prepend_bos=True).shape[1]
        if prompt_len + cfg.sample_tokens > n_ctx:
            raise ValueError(
                f"sample_prompt ({prompt_len} tokens with <|endoftext|>) + sample_tokens={cfg.sample_tokens} "
                f"exceed the {cfg.preset} preset's n_ctx={n_ctx}; lower sample_tokens or shorten the prompt"
            )
        # Before the data, which may be a long download.
        check_directory_path(self.out_dir, "out_dir")
        check_directory_path(default_cache_dir() if cfg.cache_dir is None else cfg.cache_dir, "cache_dir")
        # An earlier run is refused now, before the data (perhaps a long download), but --overwrite
        # deletes it only once the data has loaded: a typo in --dataset must not cost that run.
        earlier = [] if resume else self._earlier_run()
        # Likewise the checkpoint to resume, and whether it fits this model and unembedding.
        resuming = self._checkpoint_to_resume() if resume else None

        torch.manual_seed(cfg.seed)
        self.model = Transformer(cfg.model_config).to(self.device)
        if self.device.type == "cpu":
            make_parameters_contiguous(self.model)
        if not cfg.unembed_bias:
            # Left at its initial zeros: no gradient, and not in the optimizer (param_groups skips it).
            self.model.unembed.b_U.requires_grad_(False)
        if cfg.tie_embeddings:
            tie_embeddings(self.model)  # after make_parameters_contiguous, which would untie them
        groups = param_groups(self.model, cfg.weight_decay, exclude={"unembed.W_U"} if cfg.tie_embeddings else ())
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in groups],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=self.device.type in ("cuda", "cpu"),  # one kernel over all parameters: 2x faster on CPUs too
        )
        self.data = data if data is not None else self._load_data()
        self.step = 0
        self.position = DataPosition()
        self.evaluated_at = 0  # the step of the last evaluation (0: none, or the start)
        self.sampled_at: int | None = None  # the step of the last sample (None: not even the one before training)
        # (step, evaluated_at, sampled_at) of the newest checkpoint
        self._checkpointed: tuple[int, int, int | None] | None = None
        self.rows: list[dict] = []
        self._batches: Iterator | None = None
        self._interrupts = _Interrupts()
        train_windows = self.data.loader(
            "train", n_ctx=n_ctx, batch_size=cfg.batch_size, stride=cfg.stride, seed=cfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )  # fmt: skip
        self._val_loader()  # built here only to be checked: a val split too small for a batch would
        # otherwise be found at the first evaluation, after the training it interrupts
        self.steps_per_epoch = max(1, len(train_windows) // cfg.grad_accum)
        self.max_steps = math.ceil(cfg.epochs * self.steps_per_epoch) if cfg.epochs else cfg.max_steps
        self.tokens_per_step = cfg.batch_size * n_ctx * cfg.grad_accum * self.dist.world_size
        if cfg.warmup_steps >= self.max_steps and self.dist.is_main:
            logger.warning(
                "warmup_steps=%d is not below the run's %d steps: the learning rate rises for the whole run, "
                "to %.2e at its last step (peak lr=%.2e), and the cosine decay never starts; lower --warmup-steps",
                cfg.warmup_steps, self.max_steps, lr_at(self.max_steps - 1, cfg, self.max_steps), cfg.lr,
            )  # fmt: skip
        if cfg.stride is not None and cfg.stride > n_ctx and self.dist.is_main:
            # Allowed (a thinned pass over a large corpus), but seldom meant: say what it leaves out.
            logger.warning(
                "stride=%d exceeds n_ctx=%d: %d of every %d training tokens are never a target "
                "(no window predicts them); a stride of at most n_ctx (or None, which tiles the stream) trains on all of them",
                cfg.stride, n_ctx, cfg.stride - n_ctx, cfg.stride,
            )  # fmt: skip
        if resuming is not None:
            self._resume(*resuming)
        elif earlier and self.dist.is_main:
            logger.warning("overwrite: deleting the earlier run in %s", self.out_dir)
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

        model: torch.nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
            _DDP_TRAINERS.add(self)
        self.train_model = model
        # Forward and loss compile as one graph (DDP first, then compile, as PyTorch advises), so
        # the cross-entropy fuses into a kernel that reads the bf16 logits once.
        self.loss_fn = torch.compile(self._loss) if cfg.compile else self._loss

    @property
    def trained_params(self) -> int:
        """How many numbers the optimizer trains: a tied W_U and a frozen b_U are not counted."""
        return sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])

    def _earlier_run(self) -> list[Path]:
        """The outputs of an earlier run in out_dir, which --overwrite deletes; without it, refused.

        Appending would interleave two runs' metrics, and pruning old checkpoints would delete the
        new run's (an earlier step-0000600 sorts after a new step-0000400).
        """
        earlier = [self.out_dir / name for name in (CHECKPOINTS, *RUN_FILES) if (self.out_dir / name).exists()]
        if earlier and not self.cfg.overwrite:
            names = ", ".join(p.name for p in earlier)
            if latest_checkpoint(self.out_dir) is None:  # stopped before its first checkpoint: --resume would fail
                raise FileExistsError(
                    f"{self.out_dir} holds an earlier run that stopped before its first checkpoint ({names}), so "
                    f"there is nothing to resume; pass --overwrite to delete it and start afresh, or choose another "
                    f"--out-dir"
                )
            raise FileExistsError(
                f"{self.out_dir} holds an earlier run ({names}); pass --resume to continue it, "
                f"--overwrite to delete it and start afresh, or choose another --out-dir"
            )
        return earlier

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        if not self.cfg.fused_loss:
            return lm_loss(self.train_model(inputs), targets)
        # Through train_model (DDP's forward), up to the last block; ln_final and the unembedding
        # then run inside the fused loss. DDP still reduces their gradients: it hooks every parameter.
        resid = self.train_model(inputs, stop_at_layer=self.model.cfg.n_layers)
        return unembed_lm_loss(self.model.ln_final(resid), self.model.unembed, targets)

    # data ------------------------------------------------------------------------------------

    def _load_data(self) -> TokenData:
        cfg = self.cfg
        kwargs = dict(
            text_column=cfg.text_column, split=cfg.split, config_name=cfg.config_name,
            max_examples=cfg.max_examples, val_fraction=cfg.val_fraction, num_proc=cfg.num_proc,
            cache_dir=cfg.cache_dir,
        )  # fmt: skip
        # Rank 0 tokenizes and fills the cache first; the others then read it.
        if self.dist.enabled and not self.dist.is_main:
            dist.barrier()
        data = TokenData.load(cfg.dataset, **kwargs)
        if self.dist.enabled and self.dist.is_main:
            dist.barrier()
        return data

    def _train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        cfg = self.cfg
        while True:
            loader = self.data.loader(
                "train", n_ctx=cfg.model_config.n_ctx, batch_size=cfg.batch_size, stride=cfg.stride,
                seed=cfg.seed, epoch=self.position.epoch, start=self.position.consumed,
                rank=self.dist.rank, world_size=self.dist.world_size, pin_memory=self.device.type == "cuda",
            )  # fmt: skip
            for inputs, targets in loader:
                self.position.consumed += inputs.shape[0]
                yield inputs, targets
            self.position = DataPosition(self.position.epoch + 1, 0)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self._batches is None:
            self._batches = self._train_batches()
        inputs, targets = next(self._batches)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    # steps -----------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Accumulate gradients of the mean loss over `batches`; DDP averages them across processes.

        With tied embeddings W_E's gradient is then the tied matrix's and W_U's is None."""
        total = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = self.train_model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    loss = self.loss_fn(inputs, targets) / len(batches)
                loss.backward()
            total += loss.detach()
        if self.cfg.tie_embeddings:
            fold_tied_gradient(self.model)
        return total

    def train_step(self, *, wait: bool = True) -> dict:
        """One optimizer step; returns its metrics row (step, tokens, loss, lr, grad_norm).

        wait=False leaves the loss and gradient norm as device tensors (`finish_row` reads them):
        reading them waits for the device to finish the step, so `run` reads each step's only
        after queuing the next one, and a GPU never idles while the host prepares a step.
        """
        lr = lr_at(self.step, self.cfg, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        position = dataclasses.replace(self.position)
        try:
            loss = self.forward_backward([self.next_batch() for _ in range(self.cfg.grad_accum)])
            clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            loss = self.dist.mean_over_ranks(loss)
        except BaseException:
            # A Ctrl-C lands here more often than anywhere else. Un-read this step's batches, so
            # that the checkpoint run() then writes (at the last whole step) resumes with them.
            self.position, self._batches = position, None
            self.optimizer.zero_grad(set_to_none=True)
            raise
        # The update, the step count and the step's row change together (see _Interrupts).
        with self._interrupts.commit():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            row = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss, "lr": lr,
                   "grad_norm": grad_norm}  # fmt: skip
        return finish_row(row) if wait else row

    def _val_loader(self) -> DataLoader:
        return self.data.loader(
            "val", n_ctx=self.cfg.model_config.n_ctx, batch_size=self.cfg.batch_size, seed=0,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_batches batches every time."""
        cfg = self.cfg
        self.model.eval()
        losses = []
        for inputs, targets in self._val_loader():
            with self.autocast():
                losses.append(lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)))
            if len(losses) == cfg.eval_batches:
                break
        return self.dist.mean_over_ranks(torch.stack(losses).mean()).item()

    # the loop --------------------------------------------------------------------------------

    def run(self, stop_at: int | None = None) -> list[dict]:
        """Train until max_steps (or `stop_at`, then checkpoint). Returns the metric rows."""
        if stop_at is not None:
            # Else 2.5 stopped after step 2 and True after step 1.
            if isinstance(stop_at, bool) or not isinstance(stop_at, (int, np.integer)):
                raise TypeError(f"stop_at must be an int (the step to stop after) or None, got {stop_at!r}")
            if stop_at < 1:
                raise ValueError(f"stop_at must be >= 1 (the step to stop after) or None, got {stop_at}")
        cfg, main = self.cfg, self.dist.is_main
        stop = self.max_steps if stop_at is None else min(stop_at, self.max_steps)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            logger.info(
                "training %s (%s parameters%s) on %s for %d steps of %s tokens on %s%s",
                cfg.preset, f"{self.trained_params:,}", ", W_U tied to W_E" if cfg.tie_embeddings else "",
                self.data.source, self.max_steps,
                f"{self.tokens_per_step:,}", self.device,
                f" x {self.dist.world_size} processes" if self.dist.enabled else "",
            )  # fmt: skip
            if self.step == 0 and self.sampled_at is None:  # not on resuming a checkpoint of step 0
                self._record({"step": 0, "tokens": 0, "unigram_val_loss": self._unigram()})
                self._sample("before training")
        bar = tqdm(total=stop, initial=self.step, desc="training", disable=not main, dynamic_ncols=True)
        # Each step's row is read (which waits for that step) once the next step is queued, or
        # before anything else happens at a step: evaluation, samples, a checkpoint, the end. A
        # step's time runs from its start to the next step's start (or to the reading).
        unread: list[tuple[float, dict]] = []

        def log_steps(keep: int) -> None:
            while len(unread) > keep:
                started, row = unread[0]
                row = finish_row(row)
                unread.pop(0)  # only once read: Ctrl-C while waiting leaves it to be logged
                ended = unread[0][0] if unread else time.perf_counter()
                row["tok_per_s"] = self.tokens_per_step / (ended - started)
                if main:
                    self._record(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_per_s']:,.0f}")
                bar.update(1)
                if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                    bar.close()
                    self._diverged(row)

        # This step's evaluation and sample, which a Ctrl-C cut short before the checkpoint; the
        # last step's sample comes at the end, as always.
        if self._evaluates_here() and self.evaluated_at != self.step:
            self._eval_and_plot(bar)
        if main and self._samples_mid_run() and self.sampled_at != self.step:
            self._sample(f"step {self.step}")
        try:
            with self._interrupts.install():  # see _Interrupts
                while self.step < stop:
                    started = time.perf_counter()
                    unread.append((started, self.train_step(wait=False)))
                    self._interrupts.deliver()
                    log_steps(keep=1)
                    evaluate = self._evaluates_here()
                    sample = main and self._samples_mid_run()
                    checkpoint = self._at_interval(cfg.checkpoint_interval or cfg.eval_interval)
                    if not (evaluate or sample or checkpoint or self.step == stop):
                        continue
                    log_steps(keep=0)
                    if evaluate:
                        self._eval_and_plot(bar)
                    if sample:
                        self._sample(f"step {self.step}")
                    if checkpoint:
                        self.save_checkpoint()
                bar.close()
                if main and self.step == self.max_steps and self.sampled_at != self.step:
                    self._sample(f"step {self.step} (end)")  # before the checkpoint, which then records it
        except KeyboardInterrupt as interrupt:
            log_steps(keep=0)
            bar.close()
            if main:
                path = self.save_checkpoint()
                how = "terminated (SIGTERM)" if isinstance(interrupt, TrainingTerminated) else "interrupted"
                logger.warning("%s at step %d; checkpoint saved to %s; continue with --resume", how, self.step, path)
            raise
        self.save_checkpoint()
        return self.rows

    def _at_interval(self, interval: int) -> bool:
        """Whether this step is one of every `interval` steps (never for 0, which turns them off)."""
        return interval > 0 and self.step % interval == 0

    def _samples_mid_run(self) -> bool:
        """Whether this step prints a sample before training on: every sample_interval steps but the
        last, whose sample run() prints at the end."""
        return self.step > 0 and self._at_interval(self.cfg.sample_interval) and self.step != self.max_steps

    def _evaluates_here(self) -> bool:
        """Whether this step is evaluated: every eval_interval steps, and the last step."""
        return self._at_interval(self.cfg.eval_interval) or self.step == self.max_steps

    def _diverged(self, row: dict) -> None:
        """Stop at the first non-finite loss or gradient norm. Every row is read before a checkpoint
        is written, so none holds the weights this step has already updated with NaN or inf
        gradients, and pruning never deletes the good checkpoints for a broken one."""
        if self.dist.is_main:
            plot_loss_curve(self.rows, self.out_dir / "loss_curve.png")
        last = latest_checkpoint(self.out_dir)
        raise NonFiniteLossError(
            f"step {row['step']}: loss {row['loss']}, gradient norm {row['grad_norm']} at lr {row['lr']:.2e}; "
            f"training stopped without saving these weights. "
            + (f"The newest checkpoint, {last}, is intact: " if last else "No checkpoint was written yet: ")
            + "lower --lr or lengthen --warmup-steps"
            + (", then --resume." if last else ", then start again with --overwrite.")
        )

    def _eval_and_plot(self, bar) -> None:
        val_loss = self.evaluate()
        self.evaluated_at = self.step
        if self.dist.is_main:
            self._record({"step": self.step, "tokens": self.step * self.tokens_per_step, "val_loss": val_loss,
                          "val_ppl": math.exp(min(val_loss, 50.0))})  # fmt: skip
            bar.write(f"step {self.step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50.0)):,.1f}")
            plot_loss_curve(self.rows, self.out_dir / "loss_curve.png")

    def _sample(self, label: str) -> None:
        text = sample_text(self.model, self.cfg.sample_prompt, self.cfg.sample_tokens, seed=self.cfg.seed)
        block = f"--- sample, {label} ---\n{text}\n"
        tqdm.write(block)
        with open(self.out_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(block + "\n")
        self.sampled_at = self.step

    def _unigram(self) -> float:
        from gpt2_small.data import unigram_loss

        return unigram_loss(self.data.train, self.data.val, self.cfg.model_config.d_vocab)

    def _record(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(_json_line(row))

    # checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-NNNNNNN atomically and point `latest` at it (rank 0 only)."""
        if not self.dist.is_main:
            return None
        root = self.out_dir / CHECKPOINTS
        final = root / f"step-{self.step:07d}"
        # Written again only when an evaluation or sample that a Ctrl-C cut short has run since (on resume).
        if self._checkpointed == (self.step, self.evaluated_at, self.sampled_at):
            return final
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save(tmp)
        state = {
            "step": self.step,
            "position": dataclasses.asdict(self.position),
            "evaluated_at": self.evaluated_at,
            "sampled_at": self.sampled_at,
            "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
        }
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / TRAIN_CONFIG).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        # Moved aside, not deleted in place: a crash meanwhile must not leave a half-deleted step-*
        # that latest_checkpoint would take for a complete one.
        replaced = root / f".old-{final.name}-{os.getpid()}"
        if replaced.exists():
            shutil.rmtree(replaced)
        if final.exists():
            os.replace(final, replaced)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        self._checkpointed = (self.step, self.evaluated_at, self.sampled_at)
        if replaced.exists():
            shutil.rmtree(replaced)
        for old in sorted(root.glob("step-*"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def _remove_unfinished_writes(self) -> None:
        """Clear up after a process killed inside save_checkpoint: delete its .tmp-* directory and a
        .old-* copy of a checkpoint rewritten in place whose new version did reach its name, and put
        back a .old-* whose new version did not.

        A scheduler's SIGKILL, when a checkpoint takes longer to write than the grace period after
        SIGTERM, lands there; each leftover is a whole checkpoint (about 2 GB for the gpt2 preset
        with its optimizer state), named by the dead process's id, so nothing ever reused or removed
        it. Killed between moving a step aside and renaming its rewrite, a .old-* is that step's only
        copy under a name latest_checkpoint never reads: resuming went back to an older checkpoint,
        or found none.
        """
        root = self.out_dir / CHECKPOINTS
        stale = list(root.glob(".tmp-step-*"))
        for old in sorted(root.glob(".old-step-*")):
            step = root / old.name[len(".old-") :].rsplit("-", 1)[0]
            if step.is_dir():
                stale.append(old)
            else:
                os.replace(old, step)
                logger.warning("restored %s from %s, which an unfinished rewrite of it left", step.name, old.name)
        for path in stale:
            shutil.rmtree(path)
        if stale:
            logger.warning(
                "removed %d unfinished checkpoint writes: %s", len(stale), ", ".join(sorted(p.name for p in stale))
            )

    def _checkpoint_to_resume(self) -> tuple[Path, Transformer, dict]:
        """The newest checkpoint, its model and its train_config.json, once they are known to fit
        this run; otherwise the error that says why not."""
        if self.dist.is_main:
            self._remove_unfinished_writes()
        if self.dist.enabled:  # the others look for the newest checkpoint after rank 0 may have put one back
            dist.barrier()
        path = latest_checkpoint(self.out_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out_dir / CHECKPOINTS}; start without --resume")
        saved = Transformer.load(path)  # on the CPU: load_state_dict below copies it onto the device
        if saved.cfg != self.cfg.model_config:
            diff = {k: (v, getattr(self.cfg.model_config, k)) for k, v in dataclasses.asdict(saved.cfg).items()
                    if v != getattr(self.cfg.model_config, k)}  # fmt: skip
            raise CheckpointMismatchError(
                f"checkpoint {path} holds a model with a different config (field: (checkpoint, this run)): {diff}; "
                f"use the preset it was trained with, or another --out-dir"
            )
        saved_train_config = _read_train_config(path)
        # Checkpoints from before these settings existed trained TransformerLens's form.
        trained = {name: saved_train_config.get(name, default) for name, default in UNEMBEDDING_DEFAULTS.items()}
        if differ := {name: value for name, value in trained.items() if value != getattr(self.cfg, name)}:
            flags = " ".join(f"--{'' if value else 'no-'}{name.replace('_', '-')}" for name, value in differ.items())
            raise CheckpointMismatchError(
                f"checkpoint {path} was trained with {', '.join(f'{k}={v}' for k, v in differ.items())}; resume "
                f"with {flags} (its optimizer state holds the parameters that trained: W_U only untied, b_U only "
                "with the bias)"
            )
        return path, saved, saved_train_config

    def _resume(self, path: Path, saved: Transformer, saved_train_config: dict) -> None:
        """Continue from `path` (see _checkpoint_to_resume): weights, optimizer, step, data position,
        RNG states and the metrics written up to that step."""
        self.model.load_state_dict(saved.state_dict(), strict=True)
        try:
            state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError) as e:  # a file cut short: torch's zip reader or the unpickler
            raise ValueError(
                f"--resume: {path / TRAINER_STATE} is damaged ({type(e).__name__}: {e}); delete {path.name} "
                f"(and the 'latest' pointer beside it) to resume from the checkpoint before it"
            ) from e
        self.optimizer.load_state_dict(state["optimizer"])
        match_state_layouts(self.optimizer)  # a checkpoint from a GPU run on a CPU, or the reverse
        self.step = state["step"]
        # Checkpoints from before these were kept: taken as done, as they were.
        self.evaluated_at = state.get("evaluated_at", self.step)
        self.sampled_at = state.get("sampled_at", self.step)
        self._checkpointed = (self.step, self.evaluated_at, self.sampled_at)
        self.position = DataPosition(**state["position"])
        if state["world_size"] != self.dist.world_size:
            consumed = self.position.consumed * state["world_size"] // self.dist.world_size
            logger.warning(
                "resuming a %d-process run with %d processes: the data order differs from an uninterrupted run",
                state["world_size"], self.dist.world_size,
            )  # fmt: skip
            self.position = DataPosition(self.position.epoch, consumed)
        _set_rng_state(state["rng"])
        self._warn_about_changed_settings(saved_train_config)
        self.rows = _read_rows(self.out_dir / "metrics.jsonl", up_to_step=self.step)
        # At max_steps run() would have nothing left to do, unless a Ctrl-C cut the final evaluation
        # or sample short: then run() evaluates and samples (whichever is missing) and checkpoints.
        finished = self.step > self.max_steps or (self.evaluated_at == self.step and self.sampled_at == self.step)
        if self.step >= self.max_steps and finished:
            budget = f"max_steps={self.max_steps}"
            if self.cfg.epochs:
                budget = f"epochs={self.cfg.epochs} ({self.max_steps} step{'' if self.max_steps == 1 else 's'})"
            raise ValueError(
                f"--resume: the checkpoint {path.name} is at step {self.step}, and {budget} leaves nothing to "
                f"train; raise --max-steps (or --epochs) to train on"
            )
        if self.dist.is_main:
            _write_rows(self.out_dir / "metrics.jsonl", self.rows)
        logger.info("resumed from %s at step %d", path, self.step)

    def _warn_about_changed_settings(self, saved: dict) -> None:
        """Say which settings that shape training (lr, max_steps, data, ...) differ from the checkpoint's.

        Changing them on resume is allowed (extending max_steps is common), but the run then no
        longer continues as the interrupted one would have.
        """
        if not self.dist.is_main:
            return
        changed = {
            name: (saved[name], value)
            for name, value in dataclasses.asdict(self.cfg).items()
            if name in saved and name not in _OUTSIDE_TRAJECTORY and saved[name] != value
        }
        if changed:
            logger.warning(
                "resuming with settings that differ from the checkpoint's, so later steps differ from an "
                "uninterrupted run (field: (checkpoint, now)): %s",
                changed,
            )


def _read_train_config(checkpoint: Path) -> dict:
    """The TrainConfig fields a checkpoint was written with ({} if it has no train_config.json)."""
    saved_file = checkpoint / TRAIN_CONFIG
    return _read_json(saved_file) if saved_file.is_file() else {}


def finish_row(row: dict) -> dict:
    """A metrics row with its device tensors (loss, grad_norm) read as floats."""
    return {key: value.item() if isinstance(value, Tensor) else value for key, value in row.items()}


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under out_dir/checkpoints, or None."""
    root = user_path(out_dir, "out_dir") / CHECKPOINTS
    pointer = root / "latest"
    if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
        return root / pointer.read_text().strip()
    complete = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file())
    return complete[-1] if complete else None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(state["python"])


def _read_rows(path: Path, up_to_step: int) -> list[dict]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            # A crash (or a full disk) in the middle of an append leaves the last line cut off;
            # it must not stand between the user and the checkpoint written before it.
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({e}); fix or delete that line") from e
            logger.warning("%s: dropping its last line, cut off in the middle of a write: %r", path, line[:80])
    return [r for r in rows if r["step"] <= up_to_step]


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(_json_line(r) for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _json_line(row: dict) -> str:
    # NaN and infinity are not JSON (json.dumps would write NaN, which jq and JavaScript reject): null.
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


__all__ = [
    "PRESETS",
    "PRESET_LR",
    "PRESET_UNEMBEDDING",
    "RUN_FILES",
    "UNEMBEDDING_DEFAULTS",
    "CheckpointMismatchError",
    "DataPosition",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "TrainingTerminated",
    "embeddings_tied",
    "fold_tied_gradient",
    "latest_checkpoint",
    "lm_loss",
    "lr_at",
    "param_groups",
    "pick_device",
    "plot_loss_curve",
    "preset_unembedding",
    "sample_text",
    "tie_embeddings",
    "unembed_lm_loss",
]
