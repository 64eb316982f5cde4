"""Normalisation statistics for random-weight detectors: one pass over seeded noise images.

Untrained running statistics (mean 0, var 1) normalise nothing: through a random MobileNet-v3 the signal shrinks
to ~1e-8 and every region gets the same feature; through a random ResNet-101 with frozen batch norm it grows until
float16 overflows and every score saturates to 0 or 1. One pass over noise images sets each layer's statistics
from the input it actually sees, so every layer passes on roughly unit-variance activations, as trained networks do.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def _is_frozen_norm(m: nn.Module) -> bool:
    """Frozen batch norm (detectron2's and torchvision.ops'): eval-only, statistics in plain buffers."""
    return (not isinstance(m, nn.modules.batchnorm._BatchNorm)
            and isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor))


def noise_images(n: int = 4, side: int = 256) -> torch.Tensor:
    """(n, 3, side, side) RGB in [0, 1] from the current RNG: smooth blobs like objects, plus fine texture."""
    coarse = torch.rand(n, 3, 8, 8)
    return (torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
            * 0.8 + 0.2 * torch.rand(n, 3, side, side))


@torch.no_grad()
def calibrate_normalisation(model: nn.Module, run: Callable[[torch.Tensor], Any], n: int = 4,
                            side: int = 256) -> None:
    """Set every BatchNorm / FrozenBatchNorm statistic of ``model`` from ``run(noise_images(n, side))``.

    ``run`` pushes the images (n, 3, side, side), RGB in [0, 1], through every normalised layer (backbone and
    box head). BatchNorm runs in training mode with cumulative averaging over the pass; a frozen norm takes the
    per-channel mean and variance of its first input, so it normalises that input exactly. Both leave later
    layers seeing normalised activations. Seed the RNG first: the images come from it. Runs on one thread, so
    the statistics (part of the weights) are the same at any thread count.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    frozen = [m for m in model.modules() if _is_frozen_norm(m)]
    if not bns and not frozen:
        return
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
        bn.train()
    done: set[int] = set()

    def set_from_input(module: nn.Module, args: tuple) -> None:
        if id(module) in done:
            return
        x = args[0].float()  # (N, C, H, W)
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False) - getattr(module, "eps", 0.0)
                                 ).clamp_(min=0.0)
        done.add(id(module))

    hooks = [m.register_forward_pre_hook(set_from_input) for m in frozen]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(noise_images(n, side))
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()
    missed = len(frozen) - len(done)
    if missed:
        raise RuntimeError(f"calibration reached {len(done)} of {len(frozen)} frozen norm layers: a defrag bug")
