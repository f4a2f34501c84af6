"""Where a decoding step's time goes: kernels per step, device time per step, and the top kernels.

    python benchmarks/profile_decode.py                      # GPU: bf16 eager, graphed, compiled + graphed
    python benchmarks/profile_decode.py --variants ours-bf16 --batch 64

bench_generate.py says how fast each variant decodes; this says why. GPT-2 small (random weights),
greedy, 16-token prompt, eos off. One untimed generation first (it compiles, captures the CUDA
graph and leaves them with the model, as later calls of a session find them); then a second one
runs under torch.profiler from its first decoding step to its last, so the prompt is left out.
Per decoding step (its sampling included) it reports the wall time, the device kernels launched
(inside a CUDA graph too, where the profiler records them), the time the device spent in them, and
the share of the wall time the device sat idle: a step made of many tiny kernels is bound by their
launch latencies, not by its arithmetic. Then the kernels that took the most device time. The wall
time is under the profiler, which slows every launch from Python (the eager variant's most):
bench_generate.py has the real rates. The `-eager` variant (no graph, dynamic cache) runs mostly the
same kernels one launch at a time; its per-kernel times check the profiler's timing of kernels
inside a graph (pytorch/kineto#1165 reports that wrong before CUDA 13.1).

On a CPU the "kernels" are the outermost aten operators that ran (views, which compute nothing,
left out) and their time is host time; the variant defaults to `ours` (float32). Compiled code's
own fused loops are not operators there: a CPU `-compiled` row counts only what it calls out to
(matrix multiplies, attention). Prints the tables and appends them to benchmarks/RESULTS.md with
the device and date.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import kernel_events, publish, sampler_options, sync, top_kernels  # noqa: E402
from gpt2_small import Transformer, TransformerConfig, generate, stream  # noqa: E402

PROMPT_LEN = 16


def profile_variant(variant: str, batch: int, new_tokens: int, device: torch.device) -> tuple[dict, list[tuple]]:
    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    torch.manual_seed(0)
    model = Transformer(TransformerConfig()).to(device=device, dtype=dtype).eval()
    options = {"temperature": 0, "stop_at_eos": False, **sampler_options(variant)}
    prompt = torch.randint(0, 50257, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities):
        pass  # the profiler set up before any CUDA graph exists (pytorch/pytorch#75504: else it may fail)
    with torch.no_grad():
        generate(model, prompt, new_tokens, **options)  # untimed: compiles, captures, keeps the state
        sync(device)
        steps = stream(model, prompt, new_tokens, **options)
        next(steps)  # the prompt and the first token, outside the profile
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            n_steps = sum(1 for _ in steps)
            sync(device)
            wall_us = 1e6 * (time.perf_counter() - start)
    kernels = kernel_events(prof, device)
    if not kernels:
        raise RuntimeError(f"{variant}: the profiler recorded no {device.type} kernels; nothing to report")
    busy_us = sum(us for _, us in kernels)
    row = {
        "variant": variant, "batch": batch, "steps": n_steps, "step_ms": wall_us / n_steps / 1000,
        "kernels": len(kernels) / n_steps, "busy_ms": busy_us / n_steps / 1000,
        "idle": 1 - busy_us / wall_us if device.type == "cuda" else None,
    }  # fmt: skip
    return row, top_kernels(kernels, n_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 64 on GPU, 8 on CPU)")
    parser.add_argument(
        "--variants", default=None, help="comma list: ours, ours-bf16, with -compiled or -eager (see bench_generate)"
    )
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    new_tokens = args.new_tokens or (64 if gpu else 8)
    if new_tokens < 3:
        parser.error(f"--new-tokens must be >= 3 (the first token is left out of the profile), got {new_tokens}")
    variants = (args.variants or ("ours-bf16-eager,ours-bf16,ours-bf16-compiled" if gpu else "ours")).split(",")
    known = {f"ours{dtype}{mode}" for dtype in ("", "-bf16") for mode in ("", "-compiled", "-eager")}
    if unknown := [v for v in variants if v not in known]:
        parser.error(f"unknown variants {unknown}; choose from {sorted(known)}")

    rows, tops = [], []
    for variant in variants:
        row, top = profile_variant(variant, args.batch, new_tokens, device)
        rows.append(row)
        tops += [
            f"| {variant} | `{name[:90]}` | {per_step:.1f} | {us:.1f} | {share:.1%} |"
            for name, per_step, us, share in top[: args.top]
        ]

    unit = "device" if gpu else "host"

    def idle(row: dict) -> str:
        return "n/a" if row["idle"] is None else f"{row['idle']:.0%}"

    lines = [
        f"| {r['batch']} | {r['variant']} | {r['steps']} | {r['step_ms']:.3f} | {r['kernels']:.0f} | "
        f"{r['busy_ms']:.3f} | {idle(r)} |"
        for r in rows
    ]
    title = f"profile_decode: GPT-2 small, greedy, prompt {PROMPT_LEN}, {new_tokens} new tokens, mean per step"
    publish(
        title, device,
        f"| batch | variant | steps | step (ms) | kernels / step | {unit} busy (ms) | device idle |\n"
        "|---:|---|---:|---:|---:|---:|---:|",
        lines, [], args.results,
    )  # fmt: skip
    publish(
        f"profile_decode: the kernels with the most {unit} time", device,
        "| variant | kernel | calls / step | us / call | share of busy |\n|---|---|---:|---:|---:|",
        tops, [], args.results,
    )  # fmt: skip


if __name__ == "__main__":
    main()
