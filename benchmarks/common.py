"""What every benchmark script shares: the device line of a table, publishing the table, and
reading the kernels out of a torch.profiler run."""

import collections
import datetime
import gc
import platform
import traceback
from collections.abc import Callable, Iterable

import torch
from torch.autograd import DeviceType


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, whose ops finish as they return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampler_options(variant: str) -> dict:
    """Our sampler's arguments for a bench variant: `-compiled` compiles the decoding step,
    `-eager` turns CUDA graphs off (otherwise they are on for a CUDA model)."""
    return {"cuda_graph": False if variant.endswith("-eager") else None, "compile": variant.endswith("-compiled")}


def device_line(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, 2026-11-22' (or 'CPU (x86_64), ...')."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return f"{name}, torch {torch.__version__}, {datetime.date.today().isoformat()}"


def run_variants(
    variants: Iterable[str], run_one: Callable[[str], dict], device: torch.device, label: str = ""
) -> tuple[list[dict], list[str]]:
    """run_one(variant) for each variant, freeing its memory after it: (the rows, the failures).

    A variant that raises (a kernel this GPU or torch lacks, out of memory, a compiler error) has
    its traceback printed and one line in the failures, and the other variants still run: on a
    lent GPU with minutes to spend, one failure must not cost the whole table. Publish the failures
    with the table, and exit non-zero if there are any (see `exit_status`).
    """
    rows, failures = [], []
    for variant in variants:
        try:
            rows.append(run_one(variant))
        except Exception as e:  # reported in the table and the exit status, not swallowed
            traceback.print_exc()
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failures.append(f"{label}{variant} FAILED: {type(e).__name__}: {first_line}")
        gc.collect()  # the variant's model and optimizer went out of scope with run_one()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return rows, failures


def exit_status(failures: list[str]) -> int:
    """0 when every variant ran, else 1 (the failures are in the published table)."""
    return 1 if failures else 0


def publish(title: str, device: torch.device, columns: str, lines: list[str], ratios: list[str], path: str) -> str:
    """Print a markdown table under `title` and append it to the results file at `path`."""
    table = f"### {title}\n\n{device_line(device)}\n\n{columns}\n" + "\n".join(lines)
    table += ("\n\n" + "; ".join(ratios) if ratios else "") + "\n\n"
    print(table)
    with open(path, "a", encoding="utf-8") as f:
        f.write(table)
    return table


# Operators that only make a view or read metadata: no kernel, no time of their own.
VIEW_OPS = {
    "aten::view", "aten::permute", "aten::t", "aten::transpose", "aten::unbind", "aten::select", "aten::slice",
    "aten::as_strided", "aten::expand", "aten::alias", "aten::_unsafe_view", "aten::reshape", "aten::unsqueeze",
    "aten::squeeze", "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::resolve_conj",
    "aten::resolve_neg", "aten::result_type", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero",
    "aten::numpy_T", "aten::mT", "aten::contiguous",
}  # fmt: skip


def kernel_events(prof, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel the device ran; on a CPU, of every outermost aten
    operator that computes something, with its children's time."""
    if device.type == "cuda":
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]

    def computes(event) -> bool:
        return event.name.startswith("aten::") and event.name not in VIEW_OPS

    def outermost(event) -> bool:  # a copy inside reshape or contiguous counts; the addmm inside linear does not
        parent = event.cpu_parent
        while parent is not None:
            if computes(parent):
                return False
            parent = parent.cpu_parent
        return True

    return [(e.name, e.cpu_time_total) for e in prof.events() if computes(e) and outermost(e)]


def top_kernels(kernels: list[tuple[str, float]], n_steps: int) -> list[tuple[str, float, float, float]]:
    """(name, calls per step, microseconds per call, share of all kernel time) of each distinct
    kernel in `kernels`, the most time first."""
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, us in kernels:
        by_name[name][0] += 1
        by_name[name][1] += us
    busy_us = sum(us for _, us in kernels)
    top = sorted(by_name.items(), key=lambda item: -item[1][1])
    return [(name, calls / n_steps, us / calls, us / busy_us) for name, (calls, us) in top]
