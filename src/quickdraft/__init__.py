"""quickdraft: lossless speculative decoding for Hugging Face causal language models."""

from quickdraft.drafters import Drafter, available_drafters, register
from quickdraft.engine import Engine, StreamChunk
from quickdraft.errors import InvalidRequestError, ModelLoadError, QuickdraftError, UnknownDrafterError
from quickdraft.types import DraftTree, GenerationResult, GenerationStats, SamplingParams, VerifyResult

__all__ = [
    "DraftTree",
    "Drafter",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "InvalidRequestError",
    "ModelLoadError",
    "QuickdraftError",
    "SamplingParams",
    "StreamChunk",
    "UnknownDrafterError",
    "VerifyResult",
    "available_drafters",
    "register",
]
