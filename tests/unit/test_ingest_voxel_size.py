"""Ingest records whether the voxel size was given (issue 36, item 2): by the file's metadata or
--voxel-size-um -> True; 1 µm standing in for an axis the file leaves out -> False; a stack
ingested before the record existed reads as False (unknown). The 3-D stages refuse False."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from unet_core.cli import main
from unet_core.io.ngff import open_stack


def _data() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 4000, (4, 24, 32), dtype=np.uint16)


def _imagej(path, data) -> None:  # z step 2 µm, 0.25 µm pixels: all three axes given
    tifffile.imwrite(path, data, photometric="minisblack", imagej=True, resolution=(4.0, 4.0),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})


def _ome(path, data) -> None:
    tifffile.imwrite(path, data, photometric="minisblack", ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 3.0,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeZUnit": "µm"})


def _plain(path, data) -> None:
    tifffile.imwrite(path, data, photometric="minisblack")


def _in_plane_only(path, data) -> None:  # a resolution tag for y, x but no z step
    tifffile.imwrite(path, data, photometric="minisblack", resolution=(4.0, 4.0), resolutionunit="CENTIMETER")


@pytest.mark.parametrize(
    "writer, flag, given, scale",
    [
        pytest.param(_imagej, [], True, (2.0, 0.25, 0.25), id="by-file-imagej"),
        pytest.param(_ome, [], True, (3.0, 0.5, 0.5), id="by-file-ome"),
        pytest.param(_plain, ["--voxel-size-um", "1.5,0.2,0.2"], True, (1.5, 0.2, 0.2), id="by-flag"),
        pytest.param(_imagej, ["--voxel-size-um", "1,1,1"], True, (1.0, 1.0, 1.0), id="flag-over-file"),
        pytest.param(_plain, [], False, (1.0, 1.0, 1.0), id="missing"),
        pytest.param(_in_plane_only, [], False, None, id="z-missing"),
    ],
)
def test_voxel_size_given_is_recorded(tmp_path, writer, flag, given, scale):
    src = tmp_path / "img.tif"
    writer(src, _data())
    out = tmp_path / "stack.ome.zarr"
    assert main(["ingest", str(src), str(out), *flag]) == 0
    stack = open_stack(out)
    assert stack.voxel_size_given is given
    assert stack.attrs["voxel_size_given"] is given
    if scale is not None:
        assert stack.scale == pytest.approx(scale)
    else:
        assert stack.scale[0] == 1.0  # the z step stood in


def test_a_stack_ingested_before_the_record_reads_as_not_given(tmp_path):
    src = tmp_path / "img.tif"
    _imagej(src, _data())
    out = tmp_path / "stack.ome.zarr"
    assert main(["ingest", str(src), str(out)]) == 0
    root = zarr.open_group(out, mode="r+")
    unet = dict(root.attrs["unet"])
    del unet["voxel_size_given"]
    root.attrs["unet"] = unet
    assert open_stack(out).voxel_size_given is False
