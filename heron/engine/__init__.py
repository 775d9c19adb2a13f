"""The engine core: requests in, one scheduled batch per step, tokens out."""
