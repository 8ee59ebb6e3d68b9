"""OME-Zarr adapter: pyramid, label groups, metadata readable by ome-zarr-py."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from unet_core.common.errors import UserInputError
from unet_core.io.ngff import IMAGE_LABEL, PyramidWriter, downsample_plane, label_group, open_stack


def test_downsample_rounds_and_never_blends_labels():
    img = np.array([[0, 1, 5], [2, 3, 5]], np.uint8)
    np.testing.assert_array_equal(downsample_plane(img, labels=False), [[2]])   # (0+1+2+3+2)//4
    lab = np.array([[7, 9], [9, 9]], np.uint16)
    np.testing.assert_array_equal(downsample_plane(lab, labels=True), [[7]])


def _write(path, image, labels=None):
    root = zarr.open_group(path, mode="w")
    w = PyramidWriter(root, image.shape, image.dtype, (1, 64, 64), (1.0, 0.5, 0.5), unit="micrometer")
    lw = None
    if labels is not None:
        lw = PyramidWriter(label_group(root), labels.shape, labels.dtype, (1, 64, 64), (1.0, 0.5, 0.5), labels=True, name="gt")
    for z in range(image.shape[0]):
        w.write_plane(z, image[z])
        if lw:
            lw.write_plane(z, labels[z])
    w.finish()
    if lw:
        lw.finish(IMAGE_LABEL)
    root.attrs.update({"unet": {"intensity": {"mean": 1.0, "std": 2.0}, "label_kind": "instance"}})


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.uint64])
def test_downsample_integer_mean_at_the_dtype_extremes(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(3)
    img = rng.integers(info.min, info.max, (6, 9), dtype=dtype, endpoint=True)
    img[:2, :2] = info.max  # four maxima: the accumulator must not overflow
    img[2:4, :2] = info.min
    want = (img[:6:2, :8:2].astype(object) + img[1:6:2, :8:2] + img[:6:2, 1:8:2] + img[1:6:2, 1:8:2] + 2) // 4
    got = downsample_plane(img, labels=False)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.astype(object), want)


def test_pyramid_and_ome_zarr_reader(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (2, 600, 520)).astype(np.uint8)
    labels = (image > 128).astype(np.uint32)
    _write(tmp_path / "s.ome.zarr", image, labels)
    stack = open_stack(tmp_path / "s.ome.zarr", require_labels=True)
    np.testing.assert_array_equal(stack.image[:], image)
    np.testing.assert_array_equal(stack.labels[:], labels)
    assert stack.scale == (1.0, 0.5, 0.5) and stack.unit == "micrometer"
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(tmp_path / "s.ome.zarr")))())
    assert [d.shape for d in nodes[0].data] == [(2, 600, 520), (2, 300, 260)]


def test_open_stack_errors(tmp_path):
    with pytest.raises(UserInputError, match="not a Zarr store"):
        open_stack(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "bare.zarr", mode="w")
    with pytest.raises(UserInputError, match="not a stack written by"):
        open_stack(tmp_path / "bare.zarr")
    _write(tmp_path / "nolabels.zarr", np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(UserInputError, match="no ground-truth labels"):
        open_stack(tmp_path / "nolabels.zarr", require_labels=True)


@pytest.mark.parametrize("layout", ["project", "zarr-default"])
def test_chunk_cache_reads_boxes_like_the_array_and_stays_bounded(tmp_path, layout) -> None:
    from unet_core.io.ngff import ChunkCache, create_array, direct_chunk_reader

    data = np.random.default_rng(0).integers(0, 60000, (3, 70, 90)).astype(np.uint16)
    data[1, :40] = 0  # chunks equal to the fill value are not stored
    group = zarr.open_group(tmp_path / "a.zarr", mode="w")
    if layout == "project":
        arr = create_array(group, "x", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 32))
    else:  # zarr's default codecs: read through zarr
        arr = group.create_array("x", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 32))
    arr[:] = data
    assert (direct_chunk_reader(arr) is not None) == (layout == "project")
    cache = ChunkCache(arr, max_chunks=5)
    rng = np.random.default_rng(1)
    for _ in range(40):
        z = int(rng.integers(0, 3))
        y0, x0 = int(rng.integers(0, 70)), int(rng.integers(0, 90))
        y1, x1 = int(rng.integers(y0 + 1, 71)), int(rng.integers(x0 + 1, 91))
        np.testing.assert_array_equal(cache[z, slice(y0, y1), slice(x0, x1)], data[z, y0:y1, x0:x1])
        assert len(cache._cache) <= 5


def test_mirrored_reads_through_the_chunk_cache_equal_padding_the_whole(tmp_path) -> None:
    # read_mirrored writes the in-bounds part straight into place through the cache (read_into)
    # and copies the borders from it, or gathers where one reflection is not enough
    from unet_core.common.mirror import mirror_pad, read_mirrored
    from unet_core.io.ngff import ChunkCache, create_array

    data = np.random.default_rng(3).integers(0, 65535, (2, 37, 50)).astype(np.uint16)
    arr = create_array(zarr.open_group(tmp_path / "a.zarr", mode="w"), "x", shape=data.shape, dtype=data.dtype,
                       chunks=(1, 16, 16))
    arr[:] = data
    cache = ChunkCache(arr, max_chunks=6)
    whole = mirror_pad(data, [(0, 0), (60, 60), (60, 60)])
    rng = np.random.default_rng(4)
    for _ in range(60):
        z = int(rng.integers(0, 2))
        y0, x0 = int(rng.integers(-60, 38)), int(rng.integers(-60, 40))
        y1, x1 = y0 + int(rng.integers(1, 60)), x0 + int(rng.integers(1, 70))
        got = read_mirrored(cache, (z, y0, x0), (z + 1, y1, x1))
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, whole[z : z + 1, y0 + 60 : y1 + 60, x0 + 60 : x1 + 60])


def _chunk_boxes(arr):
    from itertools import product

    grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
    for key in product(*grid):
        yield key, tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(key, arr.chunks, arr.shape))


@pytest.mark.parametrize("dtype,endian", [(np.uint16, "little"), (np.float32, "big"), (np.uint8, None)])
def test_direct_chunk_reader_decodes_every_chunk_as_zarr_does(tmp_path, dtype, endian) -> None:
    """Edge chunks (stored whole, cropped here), chunks never written (the fill value), and the
    byte order of the ``bytes`` codec: the direct read equals zarr's read chunk by chunk."""
    from zarr.codecs import BytesCodec

    from unet_core.io.ngff import compressor, direct_chunk_reader

    data = (np.random.default_rng(2).random((2, 37, 50)) * 200).astype(dtype)
    arr = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, dtype=dtype, chunks=(1, 16, 16), fill_value=7,
                            serializer=BytesCodec(endian=endian), compressors=compressor())
    arr[0] = data[0]  # slice 1 stays unwritten: no chunk files
    read = direct_chunk_reader(zarr.open_array(tmp_path / "a.zarr", mode="r"))
    assert read is not None
    for key, box in _chunk_boxes(arr):
        got = read(key)
        assert got.shape == arr.chunks and got.dtype == arr.dtype
        np.testing.assert_array_equal(got[tuple(slice(0, s.stop - s.start) for s in box)], arr[box])
    assert (read((1, 0, 0)) == 7).all()


def test_direct_chunk_reader_leaves_other_layouts_to_zarr(tmp_path) -> None:
    from unet_core.io.ngff import direct_chunk_reader

    kw = dict(shape=(2, 64, 64), dtype=np.uint16, chunks=(1, 16, 16))
    others = {
        "other codecs": zarr.create_array(tmp_path / "zstd.zarr", **kw),
        "sharded": zarr.create_array(tmp_path / "shard.zarr", shards=(1, 32, 32), **kw),
        "in memory": zarr.create_array(zarr.storage.MemoryStore(), **kw),
        "zarr v2": zarr.create_array(tmp_path / "v2.zarr", zarr_format=2, **kw),
    }
    assert {name: direct_chunk_reader(arr) for name, arr in others.items()} == dict.fromkeys(others)


def test_a_damaged_chunk_is_one_line_naming_its_file(tmp_path) -> None:
    from unet_core.io.ngff import ChunkCache, create_array

    arr = create_array(zarr.open_group(tmp_path / "a.zarr", mode="w"), "x", shape=(1, 32, 32), dtype=np.uint16,
                       chunks=(1, 16, 16))
    arr[:] = np.arange(32 * 32, dtype=np.uint16).reshape(1, 32, 32)
    chunk = tmp_path / "a.zarr" / "x" / "c" / "0" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    cache = ChunkCache(arr, max_chunks=4)
    np.testing.assert_array_equal(cache[0, slice(0, 16), slice(0, 32)], arr[0, :16])
    with pytest.raises(UserInputError, match=r"c/0/1/0: damaged Zarr chunk"):
        cache[0, slice(16, 32), slice(0, 8)]
