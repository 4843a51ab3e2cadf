"""What every benchmark prints: the machine it ran on, and markdown tables."""
from __future__ import annotations

import os

import numcodecs
import psutil
import torch
import zarr

from matryoshka.cpus import usable_cpus


def machine(device: str) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"machine: {os.cpu_count()} CPUs ({cpu}; {usable_cpus()} usable by this process), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), zarr {zarr.__version__}, "
            f"numcodecs {numcodecs.__version__}, device {device}{gpu}")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table: first column left-aligned, the others right-aligned."""
    w = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    for k, r in enumerate([header, *rows]):
        print("| " + " | ".join(c.ljust(w[0]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(r)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (x + 2) for x in w) + "|")
