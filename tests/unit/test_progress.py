"""Progress bars in log files: what a resumed training run prints."""

from __future__ import annotations

import io
import logging
import re

import pytest
import tqdm.std

from unet_core.common import progress


def test_a_resumed_bar_counts_each_iteration_once_in_a_log_file(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run resumed at iteration 3 of 10 prints 3/10, 4/10 ... 8/10, not 7/10 after one step.

    (tqdm used to count the resumed 3 again at its first print, then fell silent for as many steps.)

    In a log file the bar prints at most every 30 s. The clock stands still while the bar is made
    (as when a run starts) and then moves 31 s per iteration, so every iteration is printed.
    """
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    log_file = io.StringIO()  # not a terminal: the log-file settings
    monkeypatch.setattr(progress.sys, "stderr", log_file)
    caplog.set_level(logging.INFO, logger="unet_core")  # the bar shows while info messages are on

    bar = progress.progress_bar(range(5), desc="train", total=10, unit="it", initial=3)
    for _ in bar:
        now[0] += 31.0
    bar.close()

    counts = [int(n) for n in re.findall(r"(\d+)/10 ", log_file.getvalue())]
    assert bar.n == 8
    assert sorted(set(counts)) == [3, 4, 5, 6, 7, 8] == counts[:6], counts
