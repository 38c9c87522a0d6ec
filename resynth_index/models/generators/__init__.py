"""Candidate generators: the protocol, the diffusers backend and imported (non-runnable) services.

Re-exports only; nothing here imports torch or diffusers until a model is loaded.
"""

from resynth_index.models.generators.diffusers import DiffusersGenerator, weights_fingerprint
from resynth_index.models.generators.imported import ImportedGenerator
from resynth_index.models.generators.protocol import (
    GenerationRequest,
    GenerationSettings,
    Generator,
)

__all__ = [
    "DiffusersGenerator",
    "GenerationRequest",
    "GenerationSettings",
    "Generator",
    "ImportedGenerator",
    "weights_fingerprint",
]
