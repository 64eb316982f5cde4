"""Device choice shared by both stages."""
from __future__ import annotations


def resolve_device(device: str = "auto") -> str:
    """"auto" means cuda when present, else cpu; anything else is passed through to torch."""
    if device in ("", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
