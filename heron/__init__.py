"""heron: an LLM inference engine with efficient-inference methods as switchable features."""

import os

# PyTorch's OpenMP (libgomp) lets a thread that waits for the next parallel region spin only
# briefly (1,000 turns instead of 300,000) once it counts more of its threads than CPUs, which
# it does as soon as a second thread runs parallel work: the model loads in the main thread
# and the server steps the engine in its own. A decode step is hundreds of short parallel
# regions, each of which then wakes sleeping workers, so a step run from the server's thread
# was far slower than from the main thread; with these both run alike. The same spin budget
# as libgomp's own default, kept when oversubscribed. libgomp reads them when PyTorch loads,
# so they apply where heron is imported first; settings of the user's own win.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "300000")

import heron.plugins  # noqa: F401  (every Engine gets the method families' plugins)
from heron.config import EngineConfig, SamplingParams
from heron.errors import HeronError, InvalidRequestError, ModelLoadError
from heron.llm import LLM
from heron.outputs import CompletionOutput, Logprob, RequestOutput
from heron.structured import StructuredOutputsParams

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
    "StructuredOutputsParams",
]
__version__ = "0.1.0"
