"""Choosing the torch device: explicit choice first, then CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

from resynth_index.errors import RsxError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(choice: str = "auto") -> str:
    """Return a concrete torch device name for ``choice`` (one of DEVICE_CHOICES or 'cuda:N')."""
    import torch  # heavy: imported only when a model is actually loaded

    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available(torch) else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RsxError(f"device {choice!r} was requested but no CUDA device is available")
        return choice
    if choice == "mps":
        if not _mps_available(torch):
            raise RsxError("device 'mps' was requested but Apple MPS is not available")
        return choice
    if choice == "cpu":
        return choice
    raise RsxError(f"unknown device {choice!r}: use one of {', '.join(DEVICE_CHOICES)} or cuda:N")
