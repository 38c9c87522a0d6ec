"""Candidate generators: the protocol, the diffusers backend and imported (non-runnable) services.

Re-exports only; nothing here imports torch or diffusers until a model is loaded.
"""

from resynth_index.generators.base import (
    GenerationRequest,
    GenerationSettings,
    Generator,
)
from resynth_index.generators.diffusers_backend import DiffusersGenerator, weights_fingerprint
from resynth_index.generators.imported import ImportedGenerator

__all__ = [
    "DiffusersGenerator",
    "GenerationRequest",
    "GenerationSettings",
    "Generator",
    "ImportedGenerator",
    "weights_fingerprint",
]
