#!/usr/bin/env python
"""Does `channels_last`, bf16 autocast or `torch.compile` speed up a training step on this CPU?

Times the cddpm demo UNet's training step (noise prediction loss, backward, AdamW step) on random
batches of the demo shape (batch 8, noisy image ++ condition, 128 x 128) in every combination of
memory format (contiguous / channels_last) and precision (float32 / bf16 autocast), and with
`torch.compile` (inductor; its compilation time printed apart from the steps).

    python benchmarks/benchmark_cpu_settings.py [--steps 10] [--no-compile]

Prints the median milliseconds per step and the speed relative to float32 contiguous.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from medanomaly.bundles.precision import cpu_has_native_bf16

BUNDLE = Path(__file__).resolve().parents[1] / "monai_bundles" / "cddpm"


def demo_network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "demo.yaml")])
    return parser.get_parsed_content("network_def", instantiate=True)


def step_timer(model, channels_last: bool, bf16: bool, batch: int, size: int):
    """A function doing one training step, and the median time of `steps` of them."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = torch.randn(batch, 2, size, size).contiguous(memory_format=memory_format)
    target = torch.randn(batch, 1, size, size)
    timesteps = torch.randint(0, 1000, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.mse_loss(model(inputs, timesteps).float(), target)
        loss.backward()
        optimizer.step()

    return step


def median_ms(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    print(f"cddpm demo UNet training step, batch {args.batch}, {args.size} px, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}")
    baseline = None
    for bf16 in (False, True):
        for channels_last in (False, True):
            ms = median_ms(step_timer(demo_network(), channels_last, bf16, args.batch, args.size), args.steps)
            baseline = baseline or ms
            name = f"{'bf16 autocast' if bf16 else 'float32'}, {'channels_last' if channels_last else 'contiguous'}"
            print(f"  {name:<32s} {ms:8.1f} ms  {baseline / ms:5.2f} x")
    if not args.no_compile:
        model = demo_network()
        step = step_timer(torch.compile(model), False, True, args.batch, args.size)
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
        ms = median_ms(step, args.steps)
        print(f"  {'bf16 autocast, torch.compile':<32s} {ms:8.1f} ms  {baseline / ms:5.2f} x"
              f"  (first step, compiling: {compile_s:.0f} s)")


if __name__ == "__main__":
    main()
