"""Device names as users write them (``auto``, ``cpu``, ``cuda``, ``cuda:1``), checked before any work starts."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when present else CPU; ``cpu``/``cuda[:i]`` as given.

    Raises:
        ValueError: an unknown or unsupported device, or CUDA requested on a machine without it (one line, naming
            the device).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: unknown device {str(device)!r}; use auto, cpu or cuda[:i]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: unsupported device {str(device)!r}; use auto, cpu or cuda[:i]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} requested but CUDA is not available")
    return dev
