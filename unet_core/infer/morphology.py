"""Compiled (numba) kernels of the distance-seeded watershed of ``unet merge``.

Each kernel gives exactly the result (bit for bit, label for label) of the scipy / scikit-image
call that :mod:`unet_core.infer.instances` used before, several times faster on one core:

:func:`distance_transform_edt`
    ``scipy.ndimage.distance_transform_edt(mask)``: exact Euclidean distance, px, of each True
    pixel to the nearest False pixel. Meijster's separable algorithm on integer squared
    distances (column scans, then the lower envelope of parabolas along each row), then one
    ``sqrt`` in float64, which is how scipy forms its values too (sqrt of an exact integer).
:func:`h_maxima`
    ``skimage.morphology.h_maxima(image, h, footprint=<4-cross>) > 0`` for a float image: the
    same shifted seed ``image - h - 2 * finfo.resolution * |image|``, its grey reconstruction by
    dilation under ``image`` (Vincent's hybrid algorithm: a raster and an anti-raster scan, then a
    FIFO queue; reconstruction is uniquely defined, so any correct algorithm gives the same
    values), and the same residue test ``image - rec >= h``. scikit-image sorts every pixel
    twice (argsort + rank order) for its reconstruction; this is O(n) in practice.
:func:`flood_from_markers`
    ``skimage.segmentation.watershed(-height, markers, mask=mask, connectivity=1 or 2)`` of
    scikit-image 0.26 (markers in raster order with age 0 and their own value; each newly
    reached neighbour with the next age and the value ``max(its value, the value of the pixel
    that reached it)``; pops in (value, age) order). Since those pops follow the keys alone and
    the components of the mask never interact, each component is flooded on its own, with a
    small heap that stays in cache (:func:`_flood_by_component`). The one order the keys leave
    open, among markers of equal value, is the layout of skimage's heap; where two such markers
    of different labels share a component, skimage's heap is replayed exactly, with the same
    pushes and pops (:func:`_flood`). Older scikit-image releases order the flooding
    differently (0.24: no ``max``; 0.25: markers at ``-inf``), so there results may differ on
    ties.

The kernels are compiled on first use (``cache=True``: once per machine, then loaded from
numba's cache, about a second per process) and release the GIL, so the blocks of a merge can
run in threads. This module is imported only by merge code.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["distance_transform_edt", "h_maxima", "flood_from_markers"]

#: skimage's h_maxima widens the shift ``image - h`` by this factor times ``|image|`` (floats).
_RESOLUTION_FACTOR_F64 = 2 * np.finfo(np.float64).resolution


# --------------------------------------------------------------------------------------------
# Euclidean distance transform
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _edt_squared(mask: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """int64 squared distance of each pixel of a C-contiguous (Y, X) bool mask to the nearest
    False pixel (0 on False pixels). Assumes at least one False pixel."""
    ny, nx = mask.shape
    inf = ny + nx  # larger than any distance within the array
    g = np.empty((ny, nx), np.int64)
    # phase 1: distance to the nearest False pixel in the same column (downward, then upward)
    for j in range(nx):
        g[0, j] = 0 if not mask[0, j] else inf
    for i in range(1, ny):
        for j in range(nx):
            g[i, j] = 0 if not mask[i, j] else g[i - 1, j] + 1
    for i in range(ny - 2, -1, -1):
        for j in range(nx):
            if g[i + 1, j] < g[i, j]:
                g[i, j] = g[i + 1, j] + 1
    # phase 2: per row, lower envelope of the parabolas (x - u)^2 + g(u)^2 (Meijster et al. 2000)
    out = np.empty((ny, nx), np.int64)
    s = np.empty(nx, np.int64)
    t = np.empty(nx, np.int64)
    f = np.empty(nx, np.int64)
    for i in range(ny):
        for u in range(nx):
            f[u] = g[i, u] * g[i, u]
        q = 0
        s[0] = 0
        t[0] = 0
        for u in range(1, nx):
            while q >= 0 and (t[q] - s[q]) ** 2 + f[s[q]] > (t[q] - u) ** 2 + f[u]:
                q -= 1
            if q < 0:
                q = 0
                s[0] = u
            else:
                a = s[q]
                # first x at which parabola u is below parabola a (integer floor division)
                w = 1 + (u * u - a * a + f[u] - f[a]) // (2 * (u - a))
                if w < nx:
                    q += 1
                    s[q] = u
                    t[q] = w
        for u in range(nx - 1, -1, -1):
            out[i, u] = (u - s[q]) ** 2 + f[s[q]]
            if u == t[q]:
                q -= 1
    return out


def distance_transform_edt(mask: np.ndarray) -> np.ndarray:
    """(Y, X) float64 Euclidean distance, px, of each True pixel of a 2-D ``mask`` to the nearest
    False pixel (0 on False pixels); equal to ``scipy.ndimage.distance_transform_edt(mask)``.

    Where ``mask`` has no False pixel at all, scipy measures to the (missing) pixel (-1, 0), i.e.
    returns ``sqrt((y + 1)^2 + x^2)``; so does this function, to stay identical.
    """
    m = np.ascontiguousarray(np.asarray(mask), dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if m.size == 0:
        return np.zeros(m.shape, np.float64)
    if m.all():
        y, x = np.indices(m.shape, dtype=np.int64)
        return np.sqrt(((y + 1) ** 2 + x**2).astype(np.float64))
    return np.sqrt(_edt_squared(m).astype(np.float64))


# --------------------------------------------------------------------------------------------
# h-maxima (grey reconstruction by dilation, 4-connectivity)
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _reconstruct_dilation4(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Grey reconstruction by dilation of ``seed`` (<= ``mask`` everywhere) under ``mask``,
    4-connectivity, Vincent's hybrid algorithm (IEEE TIP 1993). Returns a new array."""
    ny, nx = seed.shape
    rec = seed.copy()
    # raster scan: propagate from the up and left neighbours
    for i in range(ny):
        for j in range(nx):
            v = rec[i, j]
            if i > 0 and rec[i - 1, j] > v:
                v = rec[i - 1, j]
            if j > 0 and rec[i, j - 1] > v:
                v = rec[i, j - 1]
            m = mask[i, j]
            rec[i, j] = v if v < m else m
    # anti-raster scan: from the down and right neighbours; queue the pixels that can still
    # raise a down/right neighbour
    n = ny * nx
    queue = np.empty(n, np.int64)
    queued = np.zeros(n, np.bool_)
    head = 0
    size = 0
    for i in range(ny - 1, -1, -1):
        for j in range(nx - 1, -1, -1):
            v = rec[i, j]
            if i < ny - 1 and rec[i + 1, j] > v:
                v = rec[i + 1, j]
            if j < nx - 1 and rec[i, j + 1] > v:
                v = rec[i, j + 1]
            m = mask[i, j]
            v = v if v < m else m
            rec[i, j] = v
            grow = False
            if i < ny - 1 and rec[i + 1, j] < v and rec[i + 1, j] < mask[i + 1, j]:
                grow = True
            if j < nx - 1 and rec[i, j + 1] < v and rec[i, j + 1] < mask[i, j + 1]:
                grow = True
            if grow:
                p = i * nx + j
                queue[(head + size) % n] = p
                size += 1
                queued[p] = True
    # FIFO propagation (a pixel is at most once in the queue, so n slots suffice)
    while size > 0:
        p = queue[head]
        head = (head + 1) % n
        size -= 1
        queued[p] = False
        i = p // nx
        j = p - i * nx
        v = rec[i, j]
        for k in range(4):
            if k == 0:
                if i == 0:
                    continue
                qi, qj = i - 1, j
            elif k == 1:
                if j == 0:
                    continue
                qi, qj = i, j - 1
            elif k == 2:
                if j == nx - 1:
                    continue
                qi, qj = i, j + 1
            else:
                if i == ny - 1:
                    continue
                qi, qj = i + 1, j
            r = rec[qi, qj]
            m = mask[qi, qj]
            if r < v and r != m:
                rec[qi, qj] = v if v < m else m
                q = qi * nx + qj
                if not queued[q]:
                    queue[(head + size) % n] = q
                    size += 1
                    queued[q] = True
    return rec


@numba.njit(cache=True, nogil=True)
def _h_maxima_f64(image: np.ndarray, h: float, factor: float) -> tuple:  # pragma: no cover
    """h-maxima of a float64 image as skimage computes them (see :func:`h_maxima`); returns
    (bool mask, ok), ok False (mask undefined) where the image holds NaN or +inf."""
    ny, nx = image.shape
    seed = np.empty((ny, nx), np.float64)
    for i in range(ny):
        for j in range(nx):
            x = image[i, j]
            if x != x or x == np.inf:
                return np.zeros((ny, nx), np.bool_), False
            seed[i, j] = (x - h) - factor * abs(x)
    rec = _reconstruct_dilation4(seed, image)
    out = np.empty((ny, nx), np.bool_)
    for i in range(ny):
        for j in range(nx):
            out[i, j] = image[i, j] - rec[i, j] >= h
    return out, True


def h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """(Y, X) bool h-maxima (4-connectivity) of a 2-D float ``image``: the pixels of the regional
    maxima that stand at least ``h`` (image units, e.g. px of distance) above every path to a
    higher maximum; equal to ``skimage.morphology.h_maxima(image, h, footprint=cross) > 0``
    (scikit-image's float arithmetic reproduced: seed ``image - h - 2 * resolution * |image|``,
    residue ``image - reconstruction >= h``).

    Raises:
        ValueError: ``h`` is 0 (as skimage), ``image`` is not 2-D, or it holds NaN or +inf
            (where skimage's seed holds NaN and skimage crashes or hangs).
        TypeError: ``image`` is neither float32 nor float64.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if img.dtype not in (np.float32, np.float64):
        raise TypeError(f"image must be float32 or float64, got {img.dtype}")
    if img.size == 0 or h > np.ptp(img):
        return np.zeros(img.shape, bool)
    if h == 0:
        raise ValueError("h = 0 is ambiguous, use local_maxima() instead?")
    img = np.ascontiguousarray(img)
    if img.dtype == np.float64:
        out, ok = _h_maxima_f64(img, float(h), _RESOLUTION_FACTOR_F64)
        if ok:
            return out
    if np.isnan(img).any() or np.isposinf(img).any():
        # the seed would hold NaN; scikit-image crashes or hangs on such an image
        raise ValueError("image holds NaN or +inf")
    # float32: skimage's arithmetic in that dtype (numpy), the reconstruction compiled
    seed = img - h - 2 * np.finfo(img.dtype).resolution * np.abs(img)
    rec = _reconstruct_dilation4(np.ascontiguousarray(seed, dtype=img.dtype), img)
    with np.errstate(invalid="ignore"):  # -inf - -inf: NaN, not a residue >= h (as skimage)
        return (img - rec) >= h


# --------------------------------------------------------------------------------------------
# seeded flooding (skimage 0.26 watershed, no compactness, no watershed line)
# --------------------------------------------------------------------------------------------


#: ``_order_key`` maps the float64 bits of a negative number through this XOR.
_LOW63 = np.int64(0x7FFFFFFFFFFFFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _order_key(v: float) -> int:  # pragma: no cover - compiled
    """int64 with the order of the float64 ``v`` (not NaN): equal keys iff equal values, so
    -0.0 and 0.0 share one key."""
    b = np.float64(v + 0.0).view(np.int64)  # + 0.0 turns -0.0 into 0.0
    return b ^ (_LOW63 if b < 0 else np.int64(0))


@numba.njit(cache=True, nogil=True)
def _padded_inputs(
    height: np.ndarray, negate: bool, markers: np.ndarray, mask: np.ndarray
) -> tuple:  # pragma: no cover - compiled
    """The flood's inputs padded by one pixel of non-mask and raveled, as skimage does: (order
    keys of the values, inside the mask, labels (the markers inside the mask, else 0), number of
    heap items (mask pixels plus markers inside the mask), ok); ok is False (the rest undefined)
    where ``height`` holds NaN. The image is -height if ``negate`` else height, in float64."""
    ny, nx = height.shape
    px = nx + 2
    npad = (ny + 2) * px
    key = np.zeros(npad, np.int64)
    inside = np.zeros(npad, np.bool_)
    lab = np.zeros(npad, np.int64)
    n_items = 0
    for i in range(ny):
        for j in range(nx):
            p = (i + 1) * px + (j + 1)
            v = np.float64(height[i, j])
            if v != v:
                return key, inside, lab, 0, False
            key[p] = _order_key(-v if negate else v)
            if mask[i, j]:
                inside[p] = True
                n_items += 1
                if markers[i, j] != 0:
                    lab[p] = markers[i, j]
                    n_items += 1
    return key, inside, lab, n_items, True


@numba.njit(cache=True, nogil=True)
def _neighbour_offsets(px: int, eight: bool) -> np.ndarray:  # pragma: no cover - compiled
    """Raveled offsets of the neighbours in a padded row of ``px`` pixels, in skimage's order
    (sorted by distance, then by raveled offset)."""
    if eight:
        return np.array([-px, -1, 1, px, -px - 1, -px + 1, px - 1, px + 1], np.int64)
    return np.array([-px, -1, 1, px], np.int64)


@numba.njit(cache=True, nogil=True)
def _unpad(lab: np.ndarray, out: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """``out`` (Y, X) filled with the padded, raveled labels ``lab`` (wrapping to ``out``'s dtype
    as numpy's astype does)."""
    ny, nx = out.shape
    px = nx + 2
    for i in range(ny):
        for j in range(nx):
            out[i, j] = lab[(i + 1) * px + (j + 1)]
    return out


# skimage's heap (:func:`_flood`): slot k is heap[2k] = value key, heap[2k + 1] = age << 32 |
# index; a slot is "smaller" than another: key <, or key == and age < (age = heap[2k + 1] >> 32).
# The heap steps run once a pixel, so they are inlined (``inline="always"``) into the kernels.


@numba.njit(cache=True, nogil=True, inline="always")
def _age_heap_push(heap: np.ndarray, items: int, v: int, age: int, p: int) -> int:  # pragma: no cover
    """Push (value key ``v``, ``age``, index ``p``) onto skimage's heap of ``items`` slots,
    sifting it up as skimage does; returns the new number of items."""
    child = items
    while child > 0:
        parent = (child + 1) // 2 - 1
        pv = heap[2 * parent]
        if v < pv or (v == pv and age < (heap[2 * parent + 1] >> 32)):
            heap[2 * child] = pv
            heap[2 * child + 1] = heap[2 * parent + 1]
            child = parent
        else:
            break
    heap[2 * child] = v
    heap[2 * child + 1] = (age << 32) | p
    return items + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _age_heap_pop(heap: np.ndarray, items: int) -> tuple:  # pragma: no cover - compiled
    """Pop the smallest slot of skimage's heap of ``items`` slots: the hole goes down the
    smaller-child path (left on ties), then the last item up (Floyd), which leaves the heap as
    skimage's sift-down does. Returns (its value key, its index, the new number of items)."""
    ev = heap[0]
    ei = heap[1] & 0xFFFFFFFF
    items -= 1
    if items > 0:
        lv = heap[2 * items]
        lp = heap[2 * items + 1]
        la = lp >> 32
        i = 0
        while True:  # hole down the smaller-child path (left on ties)
            c = 2 * i + 1
            if c >= items:
                break
            r = c + 1
            if r < items:
                rv = heap[2 * r]
                cv = heap[2 * c]
                if rv < cv or (rv == cv and (heap[2 * r + 1] >> 32) < (heap[2 * c + 1] >> 32)):
                    c = r
            heap[2 * i] = heap[2 * c]
            heap[2 * i + 1] = heap[2 * c + 1]
            i = c
        while i > 0:  # last item up while its parent is not smaller than it
            parent = (i + 1) // 2 - 1
            pv = heap[2 * parent]
            if pv < lv or (pv == lv and (heap[2 * parent + 1] >> 32) < la):
                break
            heap[2 * i] = pv
            heap[2 * i + 1] = heap[2 * parent + 1]
            i = parent
        heap[2 * i] = lv
        heap[2 * i + 1] = lp
    return ev, ei, items


@numba.njit(cache=True, nogil=True)
def _flood(
    height: np.ndarray, negate: bool, markers: np.ndarray, mask: np.ndarray, eight: bool
) -> tuple:  # pragma: no cover - compiled
    """skimage.segmentation.watershed(image, markers, mask=mask) (0.26, no compactness, no
    watershed line) with image = -height if ``negate`` else height, in float64.

    Returns (int64 labels (Y, X), ok); ok is False (labels undefined) where the image holds NaN.

    The image is padded by one pixel of non-mask and raveled, as skimage does, and the priority
    queue is the same binary min-heap on (value, age): each slot is two int64, an order key of
    the value and ``age << 32 | raveled index``; pops move the hole down the smaller-child path
    and then the last item up (Floyd), which leaves the heap exactly as skimage's sift-down does
    (the path is sorted, so the item stops below the same elements) with one comparison a level.
    """
    ny, nx = height.shape
    key, inside, lab, n_items, ok = _padded_inputs(height, negate, markers, mask)
    if not ok:
        return np.zeros((ny, nx), np.int64), False
    offsets = _neighbour_offsets(nx + 2, eight)
    heap = np.empty(2 * max(n_items, 1), np.int64)
    items = 0
    for p in range(lab.shape[0]):  # markers in raster order, age 0, their own value
        if lab[p] != 0:
            items = _age_heap_push(heap, items, key[p], 0, p)
    age = 1
    while items > 0:
        ev, ei, items = _age_heap_pop(heap, items)
        label = lab[ei]
        for k in range(offsets.shape[0]):
            q = ei + offsets[k]
            if not inside[q] or lab[q] != 0:
                continue
            age += 1
            lab[q] = label
            v = key[q]
            if v < ev:  # a pixel costs at least as much as the one that reached it
                v = ev
            items = _age_heap_push(heap, items, v, age, q)
    return _unpad(lab, np.empty((ny, nx), np.int64)), True


# a component's heap (:func:`_flood_by_component`): slot k is heap[2k] = value key,
# heap[2k + 1] = push number << 32 | index; slots compare as (key, heap[2k + 1]) pairs.


@numba.njit(cache=True, nogil=True, inline="always")
def _slot_heap_push(heap: np.ndarray, items: int, kv: int, pk: int) -> int:  # pragma: no cover
    """Push (value key ``kv``, ``pk`` = push number << 32 | index) onto a component's heap of
    ``items`` slots; returns the new number of items."""
    child = items
    while child > 0:
        parent = (child - 1) >> 1
        pv = heap[2 * parent]
        if kv < pv or (kv == pv and pk < heap[2 * parent + 1]):
            heap[2 * child] = pv
            heap[2 * child + 1] = heap[2 * parent + 1]
            child = parent
        else:
            break
    heap[2 * child] = kv
    heap[2 * child + 1] = pk
    return items + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _slot_heap_pop(heap: np.ndarray, items: int) -> tuple:  # pragma: no cover - compiled
    """Pop the smallest slot of a component's heap of ``items`` slots (the last item sifted down
    from the top); returns (its value key, its index, the new number of items)."""
    ev = heap[0]
    e = heap[1] & 0xFFFFFFFF
    items -= 1
    if items > 0:
        lv = heap[2 * items]
        lk = heap[2 * items + 1]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= items:
                break
            r = c + 1
            cv = heap[2 * c]
            if r < items:
                rv = heap[2 * r]
                if rv < cv or (rv == cv and heap[2 * r + 1] < heap[2 * c + 1]):
                    c = r
                    cv = rv
            if cv < lv or (cv == lv and heap[2 * c + 1] < lk):
                heap[2 * i] = cv
                heap[2 * i + 1] = heap[2 * c + 1]
                i = c
            else:
                break
        heap[2 * i] = lv
        heap[2 * i + 1] = lk
    return ev, e, items


@numba.njit(cache=True, nogil=True)
def _component(
    start: int, inside: np.ndarray, seen: np.ndarray, members: np.ndarray, offsets: np.ndarray
) -> int:  # pragma: no cover - compiled
    """The connected component of the mask pixel ``start`` (not yet ``seen``), breadth first:
    written to ``members[:n]`` and marked in ``seen``; returns n."""
    seen[start] = True
    members[0] = start
    n_members = 1
    h = 0
    while h < n_members:
        p = members[h]
        h += 1
        for k in range(offsets.shape[0]):
            q = p + offsets[k]
            if inside[q] and not seen[q]:
                seen[q] = True
                members[n_members] = q
                n_members += 1
    return n_members


@numba.njit(cache=True, nogil=True)
def _has_tied_labels(
    members: np.ndarray, n_members: int, key: np.ndarray, lab: np.ndarray
) -> bool:  # pragma: no cover - compiled
    """Whether two markers among ``members[:n_members]`` have equal values and different labels
    (then skimage's heap layout decides their order)."""
    n_markers = 0
    for t in range(n_members):
        if lab[members[t]] != 0:
            n_markers += 1
    if n_markers <= 1:
        return False
    mkeys = np.empty(n_markers, np.int64)
    mlabels = np.empty(n_markers, np.int64)
    n_markers = 0
    for t in range(n_members):
        p = members[t]
        if lab[p] != 0:
            mkeys[n_markers] = key[p]
            mlabels[n_markers] = lab[p]
            n_markers += 1
    order = np.argsort(mkeys)
    for t in range(1, n_markers):
        u, w = order[t - 1], order[t]
        if mkeys[u] == mkeys[w] and mlabels[u] != mlabels[w]:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def _flood_component(
    members: np.ndarray,
    n_members: int,
    key: np.ndarray,
    inside: np.ndarray,
    lab: np.ndarray,
    offsets: np.ndarray,
    heap: np.ndarray,
    slot: int,
) -> int:  # pragma: no cover - compiled
    """Flood the component ``members[:n_members]`` from its markers (in ``lab``, age 0, before
    every pixel they reach) with its own heap, numbering the pushes from ``slot``; writes the
    labels to ``lab`` and returns the next push number."""
    items = 0
    for t in range(n_members):
        p = members[t]
        if lab[p] != 0:
            items = _slot_heap_push(heap, items, key[p], (slot << 32) | p)
            slot += 1
    while items > 0:
        ev, e, items = _slot_heap_pop(heap, items)
        label = lab[e]
        for k in range(offsets.shape[0]):
            q = e + offsets[k]
            if not inside[q] or lab[q] != 0:
                continue
            lab[q] = label
            kv = key[q]
            if kv < ev:
                kv = ev
            items = _slot_heap_push(heap, items, kv, (slot << 32) | q)
            slot += 1
    return slot


@numba.njit(cache=True, nogil=True)
def _flood_by_component(
    height: np.ndarray, negate: bool, markers: np.ndarray, mask: np.ndarray, eight: bool
) -> tuple:  # pragma: no cover - compiled
    """The flood of :func:`_flood`, one connected component of ``mask`` after the other, each
    with a priority queue of its own.

    Returns (int32 labels (Y, X), status): status 0 where the labels are skimage's; 1 (labels
    unfinished) where two markers of different labels in one component have equal values; 2
    where ``height`` holds NaN.

    skimage pops its items in increasing (value, age) order: every push is worth at least the
    item popped before it, so that sequence is fixed by the keys alone, except among markers of
    equal value (all age 0), which it takes in the order its heap's layout happens to give. A
    component's labels depend only on the order of its own items, and ages order them as their
    pushes within the component do; so flooding component by component, with (value, slot)
    keys where slots number the pushes, gives skimage's labels. Equal-valued markers come here
    in breadth-first order; where two of them with different labels share a component this
    kernel gives up (status 1) and the caller replays skimage's heap; otherwise their order
    cannot change the labels (a run of equal-valued items of one label pushes the same pixels, with
    that label, whatever its order). Flooding one cell after the other keeps the memory it
    touches in cache, which the global order (every pop somewhere else in the image) does not.
    """
    ny, nx = height.shape
    key, inside, lab, _, ok = _padded_inputs(height, negate, markers, mask)
    if not ok:
        return np.zeros((ny, nx), np.int32), 2
    offsets = _neighbour_offsets(nx + 2, eight)
    npad = lab.shape[0]
    seen = np.zeros(npad, np.bool_)
    members = np.empty(npad, np.int64)  # the components with markers, breadth first, one after the other
    bounds = np.empty(npad + 1, np.int64)  # component c: members[bounds[c]:bounds[c + 1]]
    bounds[0] = 0
    n_components = 0
    for start in range(npad):  # first every component and its markers: a tie sends the whole
        if lab[start] == 0 or seen[start]:  # image to the replay before any flooding is spent
            continue
        at = bounds[n_components]
        n_members = _component(start, inside, seen, members[at:], offsets)
        if _has_tied_labels(members[at:], n_members, key, lab):
            return np.zeros((ny, nx), np.int32), 1
        n_components += 1
        bounds[n_components] = at + n_members
    heap = np.empty(2 * npad, np.int64)
    slot = np.int64(0)
    for c in range(n_components):
        at = bounds[c]
        slot = _flood_component(members[at:], bounds[c + 1] - at, key, inside, lab, offsets, heap, slot)
    return _unpad(lab, np.empty((ny, nx), np.int32)), 0


def _kernel_markers(markers: np.ndarray) -> np.ndarray:
    """Markers as the kernels take them: int32 (what ``ndi.label`` gives) as is, others as
    int64 (two compiled variants instead of one per integer type)."""
    return np.ascontiguousarray(markers, dtype=np.int32 if markers.dtype == np.int32 else np.int64)


def flood_from_markers(height: np.ndarray, markers: np.ndarray, mask: np.ndarray, *, connectivity: int = 4) -> np.ndarray:
    """(Y, X) int32 labels: flood ``mask`` from ``markers`` in order of decreasing ``height``;
    equal to ``skimage.segmentation.watershed(-height, markers, mask=mask, connectivity=1 if
    connectivity == 4 else 2).astype(np.int32)`` (scikit-image 0.26).

    Args:
        height: (Y, X) real heights (e.g. P(cell) or a distance, any real dtype); the highest
            pixels next to a basin are taken first, ties go to the pixel queued first.
        markers: (Y, X) integer (or bool) seed ids, 0 = no seed; seeds outside ``mask`` are
            dropped, as skimage does.
        mask: (Y, X) bool pixels that may be flooded.
        connectivity: 4 or 8.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    hgt = np.asarray(height)
    mk = np.asarray(markers)
    msk = np.asarray(mask, dtype=bool)
    if hgt.ndim != 2 or mk.shape != hgt.shape or msk.shape != hgt.shape:
        raise ValueError(f"height, markers and mask must be 2-D of one shape, got {hgt.shape}, {mk.shape}, {msk.shape}")
    if mk.dtype.kind not in "biu":
        raise TypeError(f"markers must be integer, got {mk.dtype}")
    if hgt.dtype in (np.float32, np.float64):
        values, negate = np.ascontiguousarray(hgt), True
    else:
        # other dtypes: negate in their own dtype first, as ``-height`` did (integers may wrap)
        values, negate = np.ascontiguousarray((-hgt).astype(np.float64)), False
    mk = _kernel_markers(mk)
    msk = np.ascontiguousarray(msk)
    ok = (hgt.shape[0] + 2) * (hgt.shape[1] + 2) < 2**31  # slot << 32 | index in an int64
    if ok:
        labels, status = _flood_by_component(values, negate, mk, msk, connectivity == 8)
        ok = status != 2
        if status == 1:  # equal-valued markers of different labels: replay skimage's heap
            labels, ok = _flood(values, negate, mk, msk, connectivity == 8)
    if not ok:  # NaN heights (skimage's own ordering decides) or over 2^31 pixels
        from skimage.segmentation import watershed

        labels = watershed(-hgt, mk, mask=msk, connectivity=1 if connectivity == 4 else 2)
    return labels.astype(np.int32, copy=False)
