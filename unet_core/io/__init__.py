"""Stage 1, data in: the embedded synthetic sample (synth), TIFF reading (tiff), the OME-Zarr
adapter (ngff) and ingest (TIFF -> OME-Zarr).
"""
