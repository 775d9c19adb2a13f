"""heron: an LLM inference engine with efficient-inference methods as switchable features."""

from heron.config import EngineConfig, SamplingParams
from heron.errors import HeronError, InvalidRequestError, ModelLoadError
from heron.llm import LLM
from heron.outputs import CompletionOutput, Logprob, RequestOutput

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "HeronError",
    "InvalidRequestError",
    "Logprob",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
