"""Measured speed and memory of the step, the grid-mask op, the input pipeline and FH masks."""
