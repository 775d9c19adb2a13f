"""Scale-out: several engine replicas on a Ray cluster behind one ``LLM``-like front.

``DataParallelLLM`` (heron.scaleout.data_parallel) starts one ``EngineReplica``
(heron.scaleout.replica) per slot as a Ray actor, each a whole engine with its own model copy,
KV cache and threads, splits a batch of prompts between them and returns the outputs in
input order. Ray is optional: ``pip install ray`` (or heron's ``[ray]`` extra)."""
