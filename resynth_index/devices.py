"""Choosing the torch device: explicit choice first, then CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(choice: str = "auto") -> str:
    """Return a concrete torch device name for ``choice`` (one of DEVICE_CHOICES or 'cuda:N')."""
    import torch

    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            from resynth_index.errors import RsxError

            raise RsxError(f"device {choice!r} was requested but no CUDA device is available")
        return choice
    if choice == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            from resynth_index.errors import RsxError

            raise RsxError("device 'mps' was requested but Apple MPS is not available")
        return choice
    if choice == "cpu":
        return choice
    from resynth_index.errors import RsxError

    raise RsxError(f"unknown device {choice!r}: use one of {', '.join(DEVICE_CHOICES)} or cuda:N")
