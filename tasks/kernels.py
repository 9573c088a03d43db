"""Compiled per-pixel kernels (numba, GIL released, compiled once and cached on disk): the cube build's resampling,
scaling, compositing and packing for storage, and the gap filling and standardisation of model inputs.

Each kernel does in one pass over memory what took several numpy passes (and temporaries), in the same float32
operations in the same order, so results are the same to the bit. Because they release the GIL, they run side by
side with GDAL's decoding (the cube's reader threads) or the model's forward (inference's prefetch thread).
"""

from __future__ import annotations

import numpy as np
from numba import njit

ONE, HALF, ZERO, NAN = np.float32(1), np.float32(0.5), np.float32(0), np.float32(np.nan)


@njit(inline="always")
def _lerp(a: float, b: float, t: float) -> float:
    """`a * (1 - t) + t * b`: linear interpolation, in the dtype of its arguments (float32 here)."""
    return a * (ONE - t) + t * b


@njit(nogil=True, cache=True, error_model="numpy")  # IEEE division: 0/0 is NaN, not an exception
def bilinear_upsample(
    raw: np.ndarray,
    nodata: float,
    factor: int,
    ri: np.ndarray,
    rt: np.ndarray,
    ci: np.ndarray,
    ct: np.ndarray,
    scale: float,
    offset: float,
    out: np.ndarray,
    missing: np.ndarray,
) -> None:
    """`raw` (source pixels) interpolated at target rows `ri + rt` and columns `ci + ct` (source pixel before each
    target centre, and the distance past it; columns repeat every `factor` with `ci` one further), rows first, in
    float32, then `* scale + offset` into `out`; `missing` set where the target has no data (`out` is
    `nodata * scale + offset` there).

    As in GDAL's warper: a target pixel has no data where the source pixel holding its centre has none, and the
    weights of the other invalid neighbours go to the valid ones (values and weights interpolated, then divided;
    without a division where all four neighbours are valid). Columns are done one phase of the factor at a time,
    so that the inner loops read consecutive source pixels (vectorised, no gathers); at a factor of 2 (Sentinel-2's
    20 m bands on a 10 m grid), both phases go in one loop, so that the stores are consecutive too. Inner loops
    index slices by their loop variable alone: numba then knows the index is not negative and leaves out Python's
    wraparound, which kept `rows[k0 + m]` from vectorising (1.97 -> 0.45 ns a pixel at a factor of 2, measured).
    """
    n_cols, width = ci.size, raw.shape[1]
    s, o = np.float32(scale), np.float32(offset)
    empty = np.float32(nodata) * s + o
    rows = np.empty(width, np.float32)
    weights = np.empty(width, np.float32)
    for y in range(ri.size):
        k, w = ri[y], rt[y]
        near_r = k + (1 if w >= HALF else 0)  # the source row holding the target row's centre
        holes = 0
        for x in range(width):  # most row pairs have no no-data at all: then these are the rows
            a, b = raw[k, x], raw[k + 1, x]
            holes += (a == nodata) | (b == nodata)
            rows[x] = _lerp(np.float32(a), np.float32(b), w)
        first, last = width, width  # the first and last source columns with no data in rows k or k + 1
        if holes:
            first, last = 0, width - 1
            while first < width and raw[k, first] != nodata and raw[k + 1, first] != nodata:
                first += 1
            while last >= first and raw[k, last] != nodata and raw[k + 1, last] != nodata:
                last -= 1
            for x in range(width):  # the same values where both rows are valid
                va, vb = np.float32(raw[k, x] != nodata), np.float32(raw[k + 1, x] != nodata)
                rows[x] = _lerp(np.float32(raw[k, x]) * va, np.float32(raw[k + 1, x]) * vb, w)
                weights[x] = _lerp(va, vb, w)
        pairwise = factor == 2 and n_cols > 1  # Sentinel-2's 20 m bands: both phases in one loop, every column
        if pairwise:  # (those next to no-data are done again below, with weights)
            t0, t1 = ct[0], ct[1]
            a, b = rows[ci[0] :], rows[ci[1] :]
            pairs = n_cols // 2
            for m in range(pairs):  # consecutive stores: vectorised
                out[y, 2 * m] = _lerp(a[m], a[m + 1], t0) * s + o
                out[y, 2 * m + 1] = _lerp(b[m], b[m + 1], t1) * s + o
            if n_cols % 2:
                out[y, n_cols - 1] = _lerp(a[pairs], a[pairs + 1], t0) * s + o
        for p in range(min(factor, n_cols)):
            k0, t = ci[p], ct[p]
            near_c = k0 + (1 if t >= HALF else 0)
            n = (n_cols - p + factor - 1) // factor
            # columns k0 + m and k0 + m + 1 both valid before `first` and after `last`: no weights to divide by
            m1, m2 = min(max(first - 1 - k0, 0), n), min(max(last + 1 - k0, 0), n)
            m2 = max(m1, m2)
            a, v = rows[k0:], weights[k0:]
            for lo, hi in ((0, 0 if pairwise else m1), (n if pairwise else m2, n)):
                for m in range(lo, hi):
                    out[y, p + factor * m] = _lerp(a[m], a[m + 1], t) * s + o
            for m in range(m1, m2):
                value = _lerp(a[m], a[m + 1], t) / _lerp(v[m], v[m + 1], t) * s + o  # NaN: 0/0
                valid = raw[near_r, near_c + m] != nodata
                out[y, p + factor * m] = value if valid else empty
                missing[y, p + factor * m] |= not valid


@njit(nogil=True, cache=True)
def scale_band(raw: np.ndarray, nodata: float, scale: float, offset: float, out: np.ndarray, missing: np.ndarray):
    """`out = raw * scale + offset` in float32, and `missing` set where `raw` is `nodata`, in one pass."""
    s, o = np.float32(scale), np.float32(offset)
    for y in range(raw.shape[0]):
        for x in range(raw.shape[1]):
            v = raw[y, x]
            out[y, x] = np.float32(v) * s + o
            missing[y, x] |= v == nodata


@njit(nogil=True, cache=True)
def mask_lookup(codes: np.ndarray, rows: np.ndarray, cols: np.ndarray, valid: np.ndarray, missing: np.ndarray) -> None:
    """`missing[y, x]` set where `valid[codes[rows[y], cols[x]]]` is False: a mask asset's codes (SCL classes, QA
    bits) through a table, each pixel taking the code of the source pixel `rows`, `cols` name (nearest resampling of
    a coarser mask on the way, or `arange`s for one on the pixels of `missing`). Rows that repeat a source row reuse
    its lookups."""
    line = np.empty(missing.shape[1], np.bool_)  # the lookups of the source row last looked up
    for y in range(missing.shape[0]):
        row = rows[y]
        if y == 0 or row != rows[y - 1]:
            for x in range(missing.shape[1]):
                line[x] = not valid[codes[row, cols[x]]]
        for x in range(missing.shape[1]):
            missing[y, x] |= line[x]


@njit(nogil=True, cache=True)
def _nan_where_invalid(valid: np.ndarray, y: int, mask: np.ndarray) -> None:
    """`mask` `(n, w)` = 1 where row `y` of `valid` `(n, h, w)` is True, NaN elsewhere (float32): a value times it is
    NaN where not valid. The medians and means below multiply by it instead of testing `valid` per band, which let
    them vectorise (3-18x faster, measured). One row at a time, into the caller's `mask`: a mask of the whole stack,
    new at every call, was memory the system had to fault in and zero for every bin of every block."""
    for i in range(valid.shape[0]):
        for x in range(valid.shape[2]):
            mask[i, x] = ONE if valid[i, y, x] else NAN


@njit(inline="always")
def _pack(values: np.ndarray, scale: float, offset: float, fill: int, out: np.ndarray) -> int:
    """`out` = `values` (float32, 1-D) as unsigned integers `round((value - offset) / scale)` (in float64, half to
    even), `fill` (below 2**31) where a value is NaN; values beyond `[0, fill - 1]` are clipped to it. The number
    clipped."""
    top, clipped = np.float64(fill - 1), 0
    for i in range(values.size):  # branch-free: vectorised (a branch per value took twice the time, measured)
        v = values[i]
        q = np.rint((np.float64(v) - offset) / scale)
        clipped += (q < 0) | (q > top)
        out[i] = fill if v != v else np.int32(min(max(q, 0.0), top))  # int32: vectorised, int64 is not
    return clipped


@njit(nogil=True, cache=True)
def nan_median(stack: np.ndarray, valid: np.ndarray, scale: float, offset: float, fill: int, out: np.ndarray) -> int:
    """`out` `(bands, h, w)` = median over the first axis of `(n, bands, h, w)` of the values `valid` `(n, h, w)` and
    not NaN, packed (`_pack`: `fill` where there are none); of an even count, the mean of the two middle values. The
    number clipped. Each row of medians is packed while it is in the CPU's cache: on a 256 px block of 10 bands,
    0.50-0.60 ms for one or two values a pixel, against 0.70-0.87 ms for the medians then the packing (measured)."""
    n, bands, h, w = stack.shape
    clipped = 0
    row = np.empty(w, np.float32)  # one row of medians
    if n <= 2:  # most bins: the mean of the valid ones
        mask = np.empty((n, w), np.float32)
        for y in range(h):
            _nan_where_invalid(valid, y, mask)
            for c in range(bands):
                for x in range(w):
                    a = stack[0, c, y, x] * mask[0, x]
                    b = stack[n - 1, c, y, x] * mask[n - 1, x]
                    row[x] = b if a != a else (a if b != b else (a + b) * HALF)
                clipped += _pack(row, scale, offset, fill, out[c, y])
        return clipped
    ordered = np.empty((n, w), np.float32)  # one row of pixels, NaN as +inf, sorted across the stack
    count = np.empty(w, np.int64)
    for c in range(bands):
        for y in range(h):
            count[:] = 0
            for i in range(n):
                for x in range(w):
                    v = stack[i, c, y, x]
                    ok = valid[i, y, x] and v == v
                    ordered[i, x] = v if ok else np.inf
                    count[x] += ok
            for r in range(n):  # odd-even transposition sort: branch-free, vectorised along the row
                for i in range(r % 2, n - 1, 2):
                    for x in range(w):
                        a, b = ordered[i, x], ordered[i + 1, x]
                        ordered[i, x], ordered[i + 1, x] = min(a, b), max(a, b)
            for x in range(w):
                k = count[x]
                middle = (ordered[max(k - 1, 0) // 2, x] + ordered[k // 2, x]) * HALF
                row[x] = middle if k else np.nan
            clipped += _pack(row, scale, offset, fill, out[c, y])
    return clipped


@njit(nogil=True, cache=True)
def valid_fraction(valid: np.ndarray, n: int, out: np.ndarray) -> None:
    """`out` `(h, w)` = the number of True in `valid` `(k, h, w)` over `n` (float32, `sum / n` as numpy's; 0 where `k`
    is 0), in one pass and without temporaries: 13-22 us a 256 px block against numpy's 35-63 us (measured)."""
    total = np.float32(max(n, 1))
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            out[y, x] = ZERO
        for i in range(valid.shape[0]):
            for x in range(out.shape[1]):
                out[y, x] += ONE if valid[i, y, x] else ZERO
        for x in range(out.shape[1]):
            out[y, x] /= total


@njit(nogil=True, cache=True)
def nan_mean(stack: np.ndarray, valid: np.ndarray, out: np.ndarray) -> None:
    """`out` = mean over the first axis of `(n, bands, h, w)` of the values `valid` `(n, h, w)` and not NaN (NaN
    where there are none), summed in order in float32 (a row of pixels at a time: the inner loops run along it)."""
    n, bands, h, w = stack.shape
    mask = np.empty((n, w), np.float32)
    total, count = np.empty(w, np.float32), np.empty(w, np.float32)
    for y in range(h):
        _nan_where_invalid(valid, y, mask)
        for c in range(bands):
            total[:] = ZERO
            count[:] = ZERO
            for i in range(n):
                for x in range(w):
                    v = stack[i, c, y, x] * mask[i, x]
                    ok = v == v
                    total[x] += v if ok else ZERO
                    count[x] += ONE if ok else ZERO
            for x in range(w):
                out[c, y, x] = total[x] / count[x] if count[x] else NAN


PIXELS = 512  # pixels per pass of `prepare_series`: a few dates x bands of them stay in the CPU's cache


@njit(nogil=True, cache=True)
def prepare_series(
    values: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    fill: bool,
    missing: float,
    x: np.ndarray,
    valid: np.ndarray,
) -> None:
    """Model inputs of `values` `(T, C, P)` (NaN where a date has no observation): `x` `(T, C, P)` standardised with
    `mean` and `std` per band, gaps filled linearly in time when `fill` (before the first and after the last valid
    date, the nearest valid value), `missing` where a value stays unknown (0, the band mean, for a model; NaN to
    keep gaps); `valid` `(T, P)`, True where no band is NaN. A series' gaps are those of its own band."""
    t_len, n_bands, n_pixels = values.shape
    unknown = np.float32(missing)
    before = np.empty((t_len, PIXELS), np.int64)  # the last valid date at or before each date (-1 if none)
    after = np.empty(PIXELS, np.int64)  # the first valid date at or after the current one (t_len if none)
    for p0 in range(0, n_pixels, PIXELS):  # every inner loop runs along pixels: contiguous, vectorised
        n = min(p0 + PIXELS, n_pixels) - p0
        for t in range(t_len):
            valid[t, p0 : p0 + n] = True
            for c in range(n_bands):
                for i in range(n):
                    v = values[t, c, p0 + i]
                    valid[t, p0 + i] &= v == v
        for c in range(n_bands):
            m, s = np.float32(mean[c]), np.float32(std[c])
            for t in range(t_len):
                for i in range(n):
                    v = values[t, c, p0 + i]
                    before[t, i] = t if v == v else (before[t - 1, i] if t else -1)
            after[:n] = t_len
            for t in range(t_len - 1, -1, -1):
                for i in range(n):
                    v = values[t, c, p0 + i]
                    if v == v:
                        after[i] = t
                    elif fill:
                        prev, nxt = before[t, i], after[i]
                        if prev >= 0 or nxt < t_len:
                            a = values[prev if prev >= 0 else nxt, c, p0 + i]
                            b = values[nxt if nxt < t_len else prev, c, p0 + i]
                            v = a + (b - a) * np.float32((t - prev) / max(nxt - prev, 1))
                    z = (v - m) / s
                    x[t, c, p0 + i] = z if z == z else unknown
