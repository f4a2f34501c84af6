"""Generation throughput: our KV-cache sampler against HF GPT2LMHeadModel.generate, same weights, same run.

    python benchmarks/bench_generate.py                       # GPU: batch 1 and 64, 256 new tokens
    python benchmarks/bench_generate.py --batch-sizes 1 --new-tokens 64

Greedy decoding of GPT-2 small (random weights, eos disabled so every row runs to the end) from
a 16-token prompt. tokens/s counts generated tokens over all rows: batch * new_tokens / seconds,
prefill included, for the median of the timed calls. Each row also says whether the variant
produced exactly the tokens of the float32 HF run. Prints a table and appends it to
benchmarks/RESULTS.md with the device and date.

Every variant first makes one untimed call of the timed shape, reported as "1st call (s)": it
pays the one-time costs (kernels, allocator, compilation, our CUDA graph capture). The timed
calls then run as later calls of a session do: our fast variants replay the static cache and
CUDA graph that the first call left with the model (gpt2_small.sampling), and HF's static-cache
generate reuses the decoding forward that transformers 5 compiles at its first call on a GPU
(it allocates a new static cache per call).

For our variants a further, separate run waits for every token, to show where the time goes:
"set-up + prefill" (cache, the prompt, the first token), "1st step" (the first decoding step)
and "step" (the median of the later decoding steps, each with its sampling). The waits cost a
little, so these times add up to slightly more than "seconds".

Variants: `ours` (float32) and `hf` (float32, dynamic cache) everywhere; on CUDA also `ours-bf16`,
`ours-bf16-compiled`, `ours-bf16-eager` and `hf-static-bf16` (HF's pre-allocated static cache in
bf16). On CUDA our sampler replays each decoding step as a CUDA graph; `-eager` turns that off
(cuda_graph=False) and `-compiled` compiles the step first (compile=True; the untimed warm-up run
compiles it, at the timed runs' shapes); `-cdtuned-compiled` compiles it with inductor's
coordinate-descent tuning of its kernels' launch parameters (gpt-fast's setting for one-token
decoding; a longer compile). On a CPU the defaults shrink (batch 1 and 16, 64 new
tokens) so that the script finishes in minutes; the ratio to HF is the figure.
"""

import argparse
import functools
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import exit_status, publish, run_variants, sampler_options, sync  # noqa: E402
from gpt2_small import Transformer, generate, stream  # noqa: E402

PROMPT_LEN = 16


def hf_model(directory: Path, device: torch.device, dtype: torch.dtype):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def step_times(model: Transformer, prompt: torch.Tensor, new_tokens: int, **options) -> dict[str, float]:
    """Milliseconds for set-up + prefill, the first decoding step and the median later step,
    from one generation that waits for every token."""
    device = model.device
    sync(device)
    marks = [time.perf_counter()]
    with torch.no_grad():
        for _ in stream(model, prompt, new_tokens, temperature=0, stop_at_eos=False, **options):
            sync(device)
            marks.append(time.perf_counter())
    gaps = [1000 * (b - a) for a, b in itertools.pairwise(marks)]
    return {"prefill_ms": gaps[0], "first_step_ms": gaps[1], "step_ms": statistics.median(gaps[2:])}


# --variants' defaults, on a GPU and on a CPU.
DEFAULT_VARIANTS = ("ours,hf,ours-bf16,ours-bf16-compiled,ours-bf16-eager,hf-static-bf16", "ours,hf")
# What may follow each peer in a variant's name, in this order: a dtype, then how decoding runs.
OPTIONS = {"ours": ("bf16", "cdtuned", "compiled", "eager"), "hf": ("static", "bf16")}


def check_variant(variant: str) -> None:
    """Refuse a variant name before anything runs. Its options are read by substring and suffix, so
    a misspelt or misplaced one would otherwise be ignored and its row mislabelled."""
    peer, *options = variant.split("-")
    if peer not in OPTIONS:
        raise ValueError(f"variant {variant!r} must start with one of {', '.join(OPTIONS)}")
    allowed = OPTIONS[peer]
    known = all(option in allowed for option in options)
    if not known or options != sorted(options, key=allowed.index) or len(set(options)) < len(options):
        raise ValueError(
            f"variant {variant!r}: {peer} takes the options -{', -'.join(allowed)}, in that order, each at most once"
        )
    if {"compiled", "eager"} <= set(options):
        raise ValueError(f"variant {variant!r}: -compiled and -eager exclude each other")
    if "cdtuned" in options and "compiled" not in options:
        raise ValueError(f"variant {variant!r}: -cdtuned tunes compiled decoding; add -compiled")


def run_variant(variant: str, directory: Path, prompt: torch.Tensor, new_tokens: int, device, repeats: int):
    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    profile = None
    if variant.startswith("ours"):
        model = Transformer.from_pretrained(directory, device=device, dtype=dtype)
        options = sampler_options(variant)
        if options["compile"]:
            torch._dynamo.reset()  # compile anew, under this variant's inductor settings
            torch._inductor.config.coordinate_descent_tuning = "-cdtuned" in variant

        def call(n: int) -> torch.Tensor:
            return generate(model, prompt, n, temperature=0, stop_at_eos=False, **options)

        profile = functools.partial(step_times, model, prompt, new_tokens, **options)
    else:
        model = hf_model(directory, device, dtype)
        extra = {"cache_implementation": "static"} if "static" in variant else {}

        def call(n: int) -> torch.Tensor:
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=n, **extra)  # fmt: skip

    # The first call is of the timed shape too: a compiled step and a CUDA graph are made for
    # the cache's shape, so a shorter call would leave the timed ones to make theirs again.
    with torch.no_grad():
        sync(device)
        times, out = [], None
        for _ in range(1 + repeats):
            start = time.perf_counter()
            out = call(new_tokens)
            sync(device)
            times.append(time.perf_counter() - start)
    first_call, seconds = times[0], statistics.median(times[1:])
    steps = profile() if profile and new_tokens > 2 else {}
    return out.cpu(), prompt.shape[0] * new_tokens / seconds, seconds, {"first_call_s": first_call, **steps}


def row_of(variant: str, *, directory, prompt, new_tokens, device, repeats, outputs: dict) -> dict:
    """run_variant's timings as a table row; its tokens go to outputs[variant]."""
    out, tok_s, seconds, steps = run_variant(variant, directory, prompt, new_tokens, device, repeats)
    outputs[variant] = out
    return {"batch": prompt.shape[0], "variant": variant, "tok_s": tok_s, "seconds": seconds, **steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default 1,64 on GPU; 1,16 on CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 256 on GPU, 64 on CPU)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list of ours, hf, ours-bf16, ours-bf16-compiled, ours-bf16-eager, hf-static-bf16 "
        "(any ours variant takes -compiled, -cdtuned-compiled or -eager)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median reported)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,64" if gpu else "1,16")).split(",")]
    new_tokens = args.new_tokens or (256 if gpu else 64)
    variants = (args.variants or DEFAULT_VARIANTS[0 if gpu else 1]).split(",")
    for variant in variants:
        try:
            check_variant(variant)
        except ValueError as e:
            parser.error(str(e))
    repeats = args.repeats or (3 if gpu else 1)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # Removed afterwards, Ctrl-C included: the checkpoint is 500 MB.
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        directory = Path(tmp)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)  # GPT-2 small, random weights

        rows, failures = [], []
        for batch in batch_sizes:
            prompt = torch.randint(0, 50257, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
            prompt = prompt.to(device)
            outputs = {}
            run_one = functools.partial(
                row_of, directory=directory, prompt=prompt, new_tokens=new_tokens, device=device, repeats=repeats,
                outputs=outputs,
            )  # fmt: skip
            batch_rows, batch_failures = run_variants(variants, run_one, device, label=f"batch {batch}: ")
            reference = outputs.get("hf")
            for row in batch_rows:
                same = outputs[row["variant"]]
                row["same"] = "n/a" if reference is None else ("yes" if torch.equal(same, reference) else "no")
            rows += batch_rows
            failures += batch_failures

    def ms(row: dict, key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "n/a"

    lines = [
        f"| {r['batch']} | {r['variant']} | {r['tok_s']:,.0f} | {r['seconds']:.2f} | {r['first_call_s']:.2f} | "
        f"{r['same']} | {ms(r, 'prefill_ms')} | {ms(r, 'first_step_ms')} | {ms(r, 'step_ms')} |"
        for r in rows
    ]
    ratios = []
    for batch in batch_sizes:
        cell = {r["variant"]: r["tok_s"] for r in rows if r["batch"] == batch}
        for ours, hf in [("ours", "hf"), ("ours-bf16", "hf-static-bf16"), ("ours-bf16-compiled", "hf-static-bf16")]:
            if ours in cell and hf in cell:
                ratios.append(f"batch {batch}: {ours} / {hf} = {cell[ours] / cell[hf]:.2f}x")
    publish(
        f"bench_generate: GPT-2 small, greedy, prompt {PROMPT_LEN}, {new_tokens} new tokens", device,
        "| batch | variant | tokens/s | seconds | 1st call (s) | same tokens as hf fp32 | set-up + prefill (ms) "
        "| 1st step (ms) | step (ms) |\n|---:|---|---:|---:|---:|---|---:|---:|---:|",
        lines, ratios + failures, args.results,
    )  # fmt: skip
    sys.exit(exit_status(failures))


if __name__ == "__main__":
    main()
