"""Fixtures of the fault suite (issue 7): one uninterrupted reference run of the workflow on
the tiny config (tests/integration/config.yaml) whose bytes every kill test must reproduce.

Helpers live in ``faults.py`` (imported by the test modules as ``faults``). While developing,
``UNET_FAULT_REFERENCE=DIR`` keeps the reference run in DIR and reuses it in later sessions
(delete DIR after changing code: the reference must come from the code under test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from faults import Reference, data_digest, new_workdir, parse_jobs, snakemake


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    """One complete, uninterrupted workflow run on the tiny config (the bytes to match)."""
    keep = os.environ.get("UNET_FAULT_REFERENCE")  # developers: reuse (or fill) this directory
    if keep and (Path(keep) / "results").is_dir():
        work = Path(keep)
    else:
        work = new_workdir(Path(keep) if keep else tmp_path_factory.mktemp("reference"))
        snakemake(work, "--cores", "2")
    jobs = parse_jobs((lambda r: r.stdout + r.stderr)(snakemake(work, "-n", "-p", "--forceall", "--cores", "2")))
    assert {j.rule for j in jobs} >= {"synth", "ingest", "class_weights", "weights", "augment", "train",
                                      "predict", "merge", "evaluate"}, [j.rule for j in jobs]
    seconds: dict[str, float] = {}
    for tsv in work.rglob("benchmark/**/*.tsv"):
        rule = tsv.relative_to(tsv.parents[1]).parts[0] if tsv.parent.name != "benchmark" else tsv.stem
        try:
            seconds[rule] = max(seconds.get(rule, 0.0), float(tsv.read_text().splitlines()[1].split("\t")[0]))
        except (IndexError, ValueError):
            pass
    return Reference(work, data_digest(work), jobs, seconds)
