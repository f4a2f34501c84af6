"""What every benchmark script shares: the device line of a table, and publishing the table."""

import datetime
import platform

import torch


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


def publish(title: str, device: torch.device, columns: str, lines: list[str], ratios: list[str], path: str) -> str:
    """Print a markdown table under `title` and append it to the results file at `path`."""
    table = f"### {title}\n\n{device_line(device)}\n\n{columns}\n" + "\n".join(lines)
    table += ("\n\n" + "; ".join(ratios) if ratios else "") + "\n\n"
    print(table)
    with open(path, "a", encoding="utf-8") as f:
        f.write(table)
    return table
