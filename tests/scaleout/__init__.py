"""Scale-out tests: engine replicas on a local Ray cluster."""
