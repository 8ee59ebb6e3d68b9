"""The Snakemake workflow's side of the package: :mod:`unet_core.workflow.door` is all that
``workflow/Snakefile`` and ``workflow/rules/*.smk`` import from ``unet_core``.
"""
