"""The Hymba inference engine: checkpoint loading, the model over a per-request state, sampling, generation."""
