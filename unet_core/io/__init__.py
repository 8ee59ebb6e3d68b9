"""Stage 1, data in: TIFF reading (tiff), the OME-Zarr adapter (ngff) and ingest (TIFF -> OME-Zarr);
the embedded synthetic sample is its own package, unet_core.synth.
"""
