"""Helpers the GPU benchmarks share: device synchronisation and peak-memory readings."""

import gc

import torch


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    """Peak allocated GiB since the last reset_memory (None off the GPU)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None
