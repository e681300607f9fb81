"""The drift engine: per-route binned counts of inputs and outputs, compared window by window with a reference."""
