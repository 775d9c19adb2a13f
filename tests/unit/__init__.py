"""Unit tests: kernels, caches, block manager, sampler, policies, registries, parsers and
configuration checked on stand-in tensors and objects; no model file is loaded, no subprocess
of heron runs, no server starts (what `make test-fast` runs)."""
