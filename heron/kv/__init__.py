"""KV-cache compression inside the batched engine: policies (``registry.KV_POLICIES``, one
module each) and the one machinery that gathers their statistics and compacts the paged cache
(``compressor``)."""
