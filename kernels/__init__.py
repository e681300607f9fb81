"""Numeric kernels for the drift engine: arrays in, arrays out. This package never imports ``proxy``."""
