"""Model families (one file each), the architecture registry and the weight loaders."""
