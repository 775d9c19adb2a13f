"""Building blocks shared by the model files: norms, rotary embedding, paged attention."""
