"""Integration tests: engines on the real models, parity with transformers on the same
weights, and the `heron` command line run as a subprocess."""
