"""Training throughput: our Transformer against HF GPT2LMHeadModel (sdpa), same shapes, same run.

A third peer, `nanogpt`, is nanoGPT's layout rebuilt in benchmarks/nanogpt_style.py (tied
embeddings, fused c_attn, SDPA is_causal), since issue 3's goal is stated against nanoGPT.

    python benchmarks/bench_train.py                      # GPU: GPT-2 124M, B=16, T=1024, bf16 autocast
    python benchmarks/bench_train.py --variants ours,hf   # eager only
    python benchmarks/bench_train.py --variants ours-padded-compiled-graphs   # + CUDA graphs
    python benchmarks/bench_train.py --variants ours-padded-fusedloss-compiled,hf-padded-compiled
    python benchmarks/bench_train.py --variants ours-padded-cudnn-compiled,nanogpt-padded-flash-compiled

One training step = forward, next-token cross-entropy, backward, fused AdamW step. Prints a table
of tokens/s and MFU and appends it to benchmarks/RESULTS.md with the device and date. Tokens/s,
step and MFU time `--steps` steps back to back, synchronising once at each end, as a training loop
runs (the trainer reads each step's loss only after queuing the next step). "step alone" is the
median of as many steps, each waited for, so that the GPU idles while the host starts the next
one; the earlier rows in RESULTS.md, those without this column, were timed that way. On a CPU the
defaults shrink (B=2, T=128, eager only) so the script finishes; the ratio to HF is the figure.
`-tied` (ours only) trains W_U = W_E^T as one matrix, as the trainer's --tie-embeddings does and
as HF and nanogpt do (gpt2_small.training.tie_embeddings): the same multiplies, a third fewer
parameters for AdamW. `-fusedloss` (ours only) computes the loss as the trainer does by default: the model up to its
last block, then ln_final and gpt2_small.training.unembed_lm_loss, which never stores the logits
when it runs eagerly (compiled, it keeps as much as the plain loss: see its docstring).
`-flash` and `-cudnn` pin every peer's F.scaled_dot_product_attention to that kernel (torch
prefers cuDNN's on an H100 in some versions and FlashAttention 2 in others); profile_train.py
shows which kernels a variant ran and how long each kind took. `-stepgraph` (CUDA only) captures
the whole step, forward, backward and the AdamW update, as one CUDA graph (see
`whole_step_graph`); "warmup" then includes the capture.

MFU counts 6 FLOPs per parameter per token for every matrix multiply (the embedding lookups are
not multiplies; the unembedding is) plus 12 * n_layers * T * d_model for attention, as in the PaLM
paper and nanoGPT, against the chip's dense bf16 peak.
"""

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import exit_status, publish, run_variants, sync  # noqa: E402
from benchmarks.nanogpt_style import NanoGPTStyle  # noqa: E402
from gpt2_small.training import (  # noqa: E402
    PADDED_VOCAB,
    fold_tied_gradient,
    lm_loss,
    make_parameters_contiguous,
    tie_embeddings,
    unembed_lm_loss,
)
from solution import Transformer, TransformerConfig  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    per_block = 4 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.d_mlp
    matmul_params = cfg.n_layers * per_block + cfg.d_model * cfg.d_vocab
    return 6 * matmul_params + 12 * cfg.n_layers * seq_len * cfg.d_model


PEERS = ("ours", "hf", "nanogpt")
# --variants' defaults, on a GPU and on a CPU.
DEFAULT_VARIANTS = (
    "ours,hf,ours-compiled,hf-compiled,ours-padded-compiled,hf-padded-compiled,ours-padded-compiled-graphs,"
    "hf-padded-compiled-graphs,ours-padded-fusedloss-compiled,nanogpt-padded-compiled",
    "ours,hf,ours-fusedloss",
)
# What may follow the peer in a variant's name (see --help); "-graphs" comes last.
OPTIONS = ("padded", "tied", "fusedloss", "cdtuned", "maxautotune", "flash", "cudnn", "stepgraph", "compiled", "graphs")


# Variant suffixes that pin F.scaled_dot_product_attention to one kernel, in every peer (all three
# call SDPA). Unpinned, torch picks by its own priority, which differs between versions and GPUs.
ATTENTION_BACKENDS = {"-flash": SDPBackend.FLASH_ATTENTION, "-cudnn": SDPBackend.CUDNN_ATTENTION}


def check_variant(variant: str, device: torch.device) -> None:
    """Refuse a variant name before anything runs, rather than after minutes of other variants.
    The rest of this script reads the options by substring, so a misspelt one would otherwise be
    ignored and its row mislabelled ("ours-padded-compield" would run eagerly)."""
    peer, *options = variant.split("-")
    if peer not in PEERS:
        raise ValueError(f"variant {variant!r} must start with one of {', '.join(PEERS)}")
    unknown = [option for option in options if option not in OPTIONS]
    if unknown or len(set(options)) < len(options):
        raise ValueError(
            f"variant {variant!r}: {'unknown option -' + unknown[0] if unknown else 'an option given twice'}; "
            f"the options are -{', -'.join(OPTIONS)}, each at most once"
        )
    for option in ("cdtuned", "maxautotune", "graphs"):
        if option in options and "compiled" not in options:
            raise ValueError(f"variant {variant!r}: -{option} applies to compiled variants; add -compiled")
    if "graphs" in options and options[-1] != "graphs":
        raise ValueError(f"variant {variant!r}: -graphs comes last, after -compiled")
    for option in ("fusedloss", "tied"):
        if option in options and peer != "ours":
            raise ValueError(f"variant {variant!r}: -{option} applies to ours only")
    pinned = [suffix for suffix in ATTENTION_BACKENDS if suffix[1:] in options]
    if len(pinned) > 1:
        raise ValueError(f"variant {variant!r} pins two attention kernels ({', '.join(pinned)}); choose one")
    if "cudnn" in options and device.type != "cuda":
        raise ValueError(f"variant {variant!r}: cuDNN attention needs a CUDA device, not {device.type}")
    if "stepgraph" in options and device.type != "cuda":
        raise ValueError(f"variant {variant!r}: -stepgraph captures a CUDA graph, so it needs a CUDA device")
    if "stepgraph" in options and "graphs" in options:
        raise ValueError(f"variant {variant!r}: -stepgraph already replays the whole step as a graph; drop -graphs")


def attention_kernel(variant: str) -> contextlib.AbstractContextManager:
    """SDPA restricted to the variant's pinned kernel (an error where it cannot run), else unchanged."""
    pinned = [backend for suffix, backend in ATTENTION_BACKENDS.items() if suffix in variant]
    return sdpa_kernel(pinned) if pinned else contextlib.nullcontext()


def build(variant: str, cfg: TransformerConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if "-padded" in variant:
        cfg = dataclasses.replace(cfg, d_vocab=PADDED_VOCAB)
    if variant.startswith("ours"):
        model = Transformer(cfg)
        if device.type == "cpu":
            make_parameters_contiguous(model)  # as the trainer runs it there (see its docstring)
        if "-tied" in variant:
            tie_embeddings(model)
    elif variant.startswith("nanogpt"):
        model = NanoGPTStyle(cfg)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    return model.to(device).train()


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def prepare(variant: str, cfg: TransformerConfig, args, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """The variant's model and one training step of it (compiled on its first call, if the
    variant is). Call the step inside `attention_kernel(variant)`."""
    model = build(variant, cfg, device)

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if "-fusedloss" in variant:
            resid = model(inputs, stop_at_layer=model.cfg.n_layers)
            return unembed_lm_loss(model.ln_final(resid), model.unembed, targets)
        return lm_loss(logits_of(model, inputs), targets)

    # Compiled variants compile forward and loss together, for ours and HF alike; "-graphs" also
    # replays the compiled forward and backward as CUDA graphs (mode="reduce-overhead"),
    # "-maxautotune" lets inductor tune GEMM templates with fused epilogues, and "-cdtuned" turns on
    # inductor's coordinate-descent tuning of its own kernels (both compile for minutes).
    graphs = variant.endswith("-graphs")
    torch._dynamo.reset()  # compiled code and settings of the previous variant do not carry over
    torch._inductor.config.coordinate_descent_tuning = "-cdtuned" in variant
    if "compiled" in variant:
        mode = "reduce-overhead" if graphs else None
        if "-maxautotune" in variant:
            mode = "max-autotune" if graphs else "max-autotune-no-cudagraphs"
        loss_fn = torch.compile(loss_of, mode=mode)
    else:
        loss_fn = loss_of
    stepgraph = "-stepgraph" in variant
    tied = "-tied" in variant
    trained = [p for name, p in model.named_parameters() if not (tied and name == "unembed.W_U")]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=device.type in ("cuda", "cpu"), capturable=stepgraph)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.d_vocab, (args.batch_size, args.seq_len + 1), generator=gen).to(device)  # < 50257
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # Autocast's cache of cast weights is off under a captured step, as torch.cuda's graph helpers ask.
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16", cache_enabled=not stepgraph
    )

    def forward_backward_update() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = loss_fn(inputs, targets)
        loss.backward()
        if tied:
            fold_tied_gradient(model)
        optimizer.step()

    if stepgraph:
        return model, whole_step_graph(forward_backward_update, optimizer)

    def step() -> None:
        forward_backward_update()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def whole_step_graph(forward_backward_update: Callable[[], None], optimizer: torch.optim.Optimizer) -> Callable:
    """A training step that, on its first call, captures forward_backward_update whole (forward,
    backward and the AdamW update) as one CUDA graph, and replays it on every call: one launch
    per step and no host work between its kernels, unlike "-graphs", which leaves the optimizer
    and the launches between the forward and backward graphs to the host. The capture follows
    torch.cuda.graph's whole-network recipe: eager warm-up steps on a side stream first
    (compilation, AdamW's state), and the gradients None when captured, so that the graph
    allocates them and each replay writes them anew. Not yet run on a GPU (2026-11-24)."""
    graph: torch.cuda.CUDAGraph | None = None

    def step() -> None:
        nonlocal graph
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    optimizer.zero_grad(set_to_none=True)
                    forward_backward_update()
            torch.cuda.current_stream().wait_stream(side)
            optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward_backward_update()
        graph.replay()

    return step


def bench(variant: str, cfg: TransformerConfig, args, device: torch.device) -> dict:
    model, step = prepare(variant, cfg, args, device)
    params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())  # a tied W_U once
    with attention_kernel(variant):
        return {"variant": variant, "params": params, **time_steps(step, cfg, args, device)}


def time_steps(step: Callable[[], None], cfg: TransformerConfig, args, device: torch.device) -> dict:
    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - compile_start
    # Throughput: steps back to back, one synchronisation at each end, as a training loop runs
    # them (the host queues the next step while the device finishes the last one).
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    tok_s = args.batch_size * args.seq_len / step_s
    # Latency: each step alone, waited for (the device idles while the host starts the next).
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    synced_s = statistics.median(times)
    peak = peak_flops(device)
    mfu = tok_s * flops_per_token(cfg, args.seq_len) / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tok_s": tok_s, "step_ms": 1000 * step_s, "mfu": mfu, "synced_ms": 1000 * synced_s,
            "warmup_s": warmup_s, "mem_gib": mem}  # fmt: skip


def resolve_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, steps: tuple[int, int], variants: tuple[str, str]
) -> tuple[torch.device, list[str]]:
    """The device, and the defaults of the shape arguments for it, in place in `args`: GPT-2 124M's
    training shape on a GPU (B=16, T=1024, bf16), a small one on a CPU (B=2, T=128, fp32, so that
    the script finishes); `steps` and `variants` are the (GPU, CPU) defaults. Then the variants,
    each checked before any runs. Shared with profile_train.py."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (16 if gpu else 2)
    args.seq_len = args.seq_len or (1024 if gpu else 128)
    args.steps = args.steps or steps[0 if gpu else 1]
    args.warmup = args.warmup or (5 if gpu else 1)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    for name in ("batch_size", "seq_len", "steps", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    chosen = (args.variants or variants[0 if gpu else 1]).split(",")
    for variant in chosen:
        try:
            check_variant(variant, device)
        except ValueError as e:
            parser.error(str(e))
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list of {ours,hf,nanogpt}[-padded][-tied][-fusedloss][-cdtuned][-maxautotune][-flash|-cudnn]"
        "[-stepgraph][-compiled[-graphs]]; nanogpt is nanoGPT's layout rebuilt in benchmarks/nanogpt_style.py; "
        "-padded rounds the vocabulary up to 50304; -tied (ours only) ties W_U to W_E as HF and nanogpt do; -fusedloss (ours only) uses the trainer's fused "
        "unembedding loss; -cdtuned and -maxautotune are inductor settings for compiled variants; "
        "-flash and -cudnn pin attention to that SDPA kernel (default: torch's choice); -stepgraph (CUDA) "
        "replays the whole step, AdamW included, as one CUDA graph",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help='timed steps, run back to back (then as many again, each waited for: "step alone", median)',
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    device, variants = resolve_arguments(parser, args, steps=(20, 3), variants=DEFAULT_VARIANTS)

    cfg = TransformerConfig()  # GPT-2 small, 124M
    rows, failures = run_variants(variants, lambda variant: bench(variant, cfg, args, device), device)

    lines = []
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['mem_gib']:.1f}" if r["mem_gib"] is not None else "n/a"
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.1f}M | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | {mfu} | "
            f"{r['synced_ms']:.1f} | {r['warmup_s']:.1f} | {mem} |"
        )
    by_name = {r["variant"]: r["tok_s"] for r in rows}
    ratios = []
    for ours in (v for v in by_name if v.startswith("ours")):
        # A peer's loss is the plain one, and its embeddings are tied.
        options = ours[len("ours") :].replace("-fusedloss", "").replace("-tied", "")
        for peer in (name + options for name in PEERS[1:] if name + options in by_name):
            ratios.append(f"{ours} / {peer}: {by_name[ours] / by_name[peer]:.2f}x")
    publish(
        f"bench_train: GPT-2 124M, B={args.batch_size}, T={args.seq_len}, {args.dtype}, fused AdamW", device,
        "| variant | params | tokens/s | step (ms) | MFU | step alone (ms) | warmup (s) | peak mem (GiB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        lines, ratios + failures, args.results,
    )  # fmt: skip
    sys.exit(exit_status(failures))


if __name__ == "__main__":
    main()
