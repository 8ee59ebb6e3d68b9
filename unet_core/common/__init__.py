"""Shared primitives used by every stage: errors, geometry (boxes), atomic outputs, output
ownership (which outputs a stage may replace, and the marks by which it recognises them:
``outputs``), config numbers (``config_values``), provenance, progress bars, devices, the mirror
convention and grey-value normalisation. Nothing here knows a stage.
"""
