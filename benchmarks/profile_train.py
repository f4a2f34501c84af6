"""Where a training step's time goes: matrix multiplies, attention, LayerNorm, the loss, the optimizer.

    python benchmarks/profile_train.py        # GPU: ours, nanogpt and hf, padded and compiled, B=16, T=1024, bf16
    python benchmarks/profile_train.py --variants ours-padded-cudnn-compiled,nanogpt-padded-cudnn-compiled

bench_train.py says how fast each variant trains; this says why, side by side. Variants are
bench_train's (same names, same model, loss, fused AdamW and shapes). Each runs its warm-up steps
(compilation happens there), then `--steps` steps back to back under torch.profiler. Per step it
reports the wall time, the device kernels launched and the share of the wall time the device sat
idle; then the device time of each kind of kernel, one column per variant, so that a gap between
two variants shows up in the kind that holds it; then each variant's top kernels. The kinds go
by kernel name (see `KINDS`): cuBLAS's and inductor's matrix multiplies, FlashAttention's or
cuDNN's attention (forward and backward), LayerNorm, the cross-entropy, the fused AdamW step, the
embedding's gradient, copies and fills, and the rest: inductor's other fused kernels (GELU,
residual adds, casts) and eager elementwise kernels. An inductor kernel that fuses several kinds
counts as the first that its name matches, and LayerNorm's backward goes by no recognisable
name, so read the kinds as approximate and the top-kernels table for the names. Wall times are under the profiler, which
slows every launch from Python: bench_train.py has the real rates.

On a CPU the "kernels" are the outermost aten operators that ran and their time is host time, as
in profile_decode.py; compiled code's own fused loops are not operators there, so a CPU
`-compiled` row counts only what it calls out to (matrix multiplies, attention). Prints the tables
and appends them to benchmarks/RESULTS.md with the device and date.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_train import attention_kernel, prepare, resolve_arguments  # noqa: E402
from benchmarks.common import exit_status, kernel_events, publish, run_variants, sync, top_kernels  # noqa: E402
from solution import TransformerConfig  # noqa: E402

# (kind, pattern searched in the kernel's name), the first match wins: attention before matmul,
# as cuDNN's attention kernels are GEMM-like by name too; the loss and LayerNorm before "fused",
# which inductor's kernels that compute them also are.
KINDS = [
    ("attention", r"flash|fmha|sdpa|scaled_dot_product|attention"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce|triton_tem|aten::(addmm|mm|bmm|matmul|linear|baddbmm)\b"),
    # ours' LayerNorm is its formula in float32 (F.layer_norm only in bf16 without hooks): inductor
    # names its forward kernel after the ops it fuses (..._mean_mul_pow_sqrt_sub...)
    ("layernorm", r"layer_norm|LayerNorm|GammaBeta|mean.*pow.*sqrt"),
    ("loss", r"nll_loss|(?i:softmax)|cross_entropy"),
    ("optimizer", r"adam|multi_tensor_apply"),
    ("embedding", r"embedding|indexing_backward|index_put|scatter|radixSort|RadixSort|compute_grad_weight"),
    ("copy/fill", r"Memcpy|Memset|memcpy|memset|aten::(copy_|fill_|zero_|zeros|zeros_like|clone|to|_to_copy)$"),
    ("fused (inductor)", r"^triton_"),
]
OTHER = "other"


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, kernel)), OTHER)


def profile_variant(variant: str, cfg: TransformerConfig, args, device: torch.device) -> dict:
    model, step = prepare(variant, cfg, args, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with attention_kernel(variant):
        with profile(activities=activities):
            pass  # the profiler set up before any CUDA graph exists (pytorch/pytorch#75504: else it may fail)
        for _ in range(args.warmup):
            step()
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            wall_us = 1e6 * (time.perf_counter() - start)
    del model, step
    kernels = kernel_events(prof, device)
    if not kernels:
        raise RuntimeError(f"{variant}: the profiler recorded no {device.type} kernels; nothing to report")
    busy_us = sum(us for _, us in kernels)
    by_kind = dict.fromkeys([kind for kind, _ in KINDS] + [OTHER], 0.0)
    for name, us in kernels:
        by_kind[kind_of(name)] += us
    return {
        "variant": variant, "step_ms": wall_us / args.steps / 1000, "kernels": len(kernels) / args.steps,
        "busy_ms": busy_us / args.steps / 1000, "idle": 1 - busy_us / wall_us if device.type == "cuda" else None,
        "kind_ms": {kind: us / args.steps / 1000 for kind, us in by_kind.items()},
        "top": top_kernels(kernels, args.steps),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default=None, help="comma list of bench_train.py's variants (see its --help)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument(
        "--steps", type=int, default=None, help="profiled steps, back to back; the tables give their mean (default 3)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="unprofiled steps first (compilation happens here)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--top", type=int, default=10, help="kernels listed per variant")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    default = "ours-padded-compiled,nanogpt-padded-compiled,hf-padded-compiled"
    device, variants = resolve_arguments(parser, args, steps=(3, 3), variants=(default, "ours,nanogpt"))
    gpu = device.type == "cuda"

    cfg = TransformerConfig()  # GPT-2 small, 124M
    rows, failures = run_variants(variants, lambda variant: profile_variant(variant, cfg, args, device), device)

    unit = "device" if gpu else "host"
    shape = f"GPT-2 124M, B={args.batch_size}, T={args.seq_len}, {args.dtype}, fused AdamW"
    lines = [
        f"| {r['variant']} | {r['step_ms']:.1f} | {r['kernels']:.0f} | {r['busy_ms']:.1f} | "
        f"{'n/a' if r['idle'] is None else format(r['idle'], '.0%')} |"
        for r in rows
    ]
    publish(
        f"profile_train: {shape}, mean per step of {args.steps}", device,
        f"| variant | step (ms) | kernels / step | {unit} busy (ms) | device idle |\n|---|---:|---:|---:|---:|",
        lines, failures, args.results,
    )  # fmt: skip
    if not rows:
        sys.exit(exit_status(failures))
    kinds = [kind for kind in rows[0]["kind_ms"] if any(r["kind_ms"][kind] for r in rows)]
    by_kind = [
        f"| {kind} | "
        + " | ".join(f"{r['kind_ms'][kind]:.2f} ({r['kind_ms'][kind] / r['busy_ms']:.0%})" for r in rows)
        + " |"
        for kind in kinds
    ]
    by_kind.append("| **all** | " + " | ".join(f"**{r['busy_ms']:.2f}**" for r in rows) + " |")
    publish(
        f"profile_train: {unit} time per step (ms, share) by kind of kernel", device,
        "| kind | " + " | ".join(r["variant"] for r in rows) + " |\n|---|" + "---:|" * len(rows),
        by_kind, [], args.results,
    )  # fmt: skip
    tops = [
        f"| {r['variant']} | {kind_of(name)} | `{name[:90].replace('|', '/')}` | {per_step:.1f} | {us:.1f} | {share:.1%} |"
        for r in rows
        for name, per_step, us, share in r["top"][: args.top]
    ]
    publish(
        f"profile_train: the kernels with the most {unit} time", device,
        "| variant | kind | kernel | calls / step | us / call | share of busy |\n|---|---|---|---:|---:|---:|",
        tops, [], args.results,
    )  # fmt: skip
    sys.exit(exit_status(failures))


if __name__ == "__main__":
    main()
