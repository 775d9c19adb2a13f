"""KV-cache compression inside the batched engine: policies (``registry.POLICIES``) and the
one machinery that gathers their statistics and compacts the paged cache (``compressor``)."""
