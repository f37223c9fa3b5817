"""The compiled affine RANSAC (numba) behind ``verify.ransac_affine``: sampling, solving, scoring, refit."""

from __future__ import annotations

import numba
import numpy as np

# splitmix64 (Steele, Lea and Flood 2014): a 64-bit counter through a mixing function. Its whole state
# is one integer, so a seed fixes the stream and nothing is shared between calls or threads.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO32 = np.uint64(1 << 32)
# Matches are scored in chunks of this many; between chunks a hypothesis that can no longer reach the
# best count is abandoned. A chunk is a loop of fixed length without an exit: it compiles to SIMD.
CHUNK = 32
# Exhaustive search is decided on C(n, 3) <= max_trials, computed in int64 for n up to this.
_MAX_EXHAUSTIVE_N = 2_000_000


@numba.njit(cache=True, nogil=True, inline="always")
def _next64(state):
    """(new state, 64 random bits)."""
    state = state + _GAMMA
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def _below(state, m):
    """(new state, an integer uniform in [0, m)), 1 <= m < 2**32: Lemire's multiply-shift on the top 32
    bits, rejecting the 2**32 mod m low products that would bias it (the division only when needed)."""
    mm = np.uint64(m)
    state, bits = _next64(state)
    product = (bits >> np.uint64(32)) * mm
    if (product & _LOW32) < mm:
        reject_below = (_TWO32 - mm) % mm
        while (product & _LOW32) < reject_below:
            state, bits = _next64(state)
            product = (bits >> np.uint64(32)) * mm
    return state, np.int64(product >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def draw_triplet(state, n):
    """(new state, i, j, k): three distinct indices of range(n), n >= 3, uniform over ordered triplets."""
    state, i = _below(state, n)
    state, j = _below(state, n - 1)
    if j >= i:
        j += 1
    lo, hi = min(i, j), max(i, j)
    state, k = _below(state, n - 2)
    if k >= lo:  # skip the two taken, in increasing order
        k += 1
    if k >= hi:
        k += 1
    return state, i, j, k


@numba.njit(cache=True, nogil=True)
def next_triplet(i, j, k, n):
    """The triplet after i < j < k of range(n) in lexicographic order (0, 1, 2), (0, 1, 3), ..."""
    k += 1
    if k == n:
        j += 1
        if j == n - 1:
            i += 1
            j = i + 1
        k = j + 1
    return i, j, k


@numba.njit(cache=True, nogil=True, inline="always")
def _triangle_ok(y, x, a, b, c, ratio):
    """False when triangle (a, b, c) of points (y, x) is degenerate: its smallest height is under
    ``ratio`` times its longest side, or it has no size. 2 x area = |cross| = longest x smallest height;
    compared squared, without a sqrt."""
    uy, ux = y[b] - y[a], x[b] - x[a]
    vy, vx = y[c] - y[a], x[c] - x[a]
    wy, wx = y[c] - y[b], x[c] - x[b]
    cross = abs(uy * vx - ux * vy)
    longest2 = max(uy * uy + ux * ux, vy * vy + vx * vx, wy * wy + wx * wx)
    return longest2 > 0.0 and cross * cross >= ratio * ratio * longest2 * longest2


@numba.njit(cache=True, nogil=True)
def solve_triplet(sy, sx, dy, dx, a, b, c, out):
    """Write into ``out`` (6,) the affine map [y', x'] = [[o0, o1, o2], [o3, o4, o5]] @ [y, x, 1] taking
    source points a, b, c exactly onto their destinations; False (out untouched) when the source
    triangle is singular. With U = [s_b - s_a, s_c - s_a] and P = [d_b - d_a, d_c - d_a] as columns the
    linear part is M = P U^-1, the translation d_a - M s_a."""
    uy, ux = sy[b] - sy[a], sx[b] - sx[a]
    vy, vx = sy[c] - sy[a], sx[c] - sx[a]
    det = uy * vx - vy * ux
    if det == 0.0:
        return False
    inv = 1.0 / det
    # U = [[uy, vy], [ux, vx]], U^-1 = inv * [[vx, -vy], [-ux, uy]]
    i00, i01, i10, i11 = vx * inv, -vy * inv, -ux * inv, uy * inv
    py, px = dy[b] - dy[a], dx[b] - dx[a]
    qy, qx = dy[c] - dy[a], dx[c] - dx[a]
    out[0] = py * i00 + qy * i10
    out[1] = py * i01 + qy * i11
    out[3] = px * i00 + qx * i10
    out[4] = px * i01 + qx * i11
    out[2] = dy[a] - out[0] * sy[a] - out[1] * sx[a]
    out[5] = dx[a] - out[3] * sy[a] - out[4] * sx[a]
    return True


@numba.njit(cache=True, nogil=True)
def required_trials(num_inliers, num_points, confidence):
    """Trials after which an all-inlier 3-sample has been drawn with probability ``confidence``,
    given the inlier ratio w = num_inliers / num_points: log(1 - confidence) / log(1 - w^3)."""
    if num_inliers <= 0:
        return np.inf
    w3 = (num_inliers / num_points) ** 3
    if w3 >= 1.0:
        return 0.0
    if confidence >= 1.0:
        return np.inf
    return np.log1p(-confidence) / np.log1p(-w3)


@numba.njit(cache=True, nogil=True, inline="always")
def _is_inlier(m, sy, sx, dy, dx, i, threshold2):
    ey = m[0] * sy[i] + m[1] * sx[i] + m[2] - dy[i]
    ex = m[3] * sy[i] + m[4] * sx[i] + m[5] - dx[i]
    return ey * ey + ex * ex < threshold2


@numba.njit(cache=True, nogil=True)
def count_inliers(m, sy, sx, dy, dx, threshold2, at_least):
    """Matches whose squared residual under model m (6,) is below threshold2; -1 as soon as fewer than
    ``at_least`` remain possible (checked between chunks)."""
    n = sy.shape[0]
    m0, m1, m2, m3, m4, m5 = m[0], m[1], m[2], m[3], m[4], m[5]
    count = 0
    full = n - n % CHUNK
    for start in range(0, full, CHUNK):
        chunk = 0
        for i in range(start, start + CHUNK):
            ey = m0 * sy[i] + m1 * sx[i] + m2 - dy[i]
            ex = m3 * sy[i] + m4 * sx[i] + m5 - dx[i]
            if ey * ey + ex * ex < threshold2:
                chunk += 1
        count += chunk
        if count + (n - start - CHUNK) < at_least:
            return -1
    for i in range(full, n):
        count += _is_inlier(m, sy, sx, dy, dx, i, threshold2)
    return count if count >= at_least else -1


@numba.njit(cache=True, nogil=True)
def _inlier_cost(m, sy, sx, dy, dx, threshold2):
    """Sum of the squared residuals below threshold2 (the tie-break between equal counts)."""
    cost = 0.0
    for i in range(sy.shape[0]):
        ey = m[0] * sy[i] + m[1] * sx[i] + m[2] - dy[i]
        ex = m[3] * sy[i] + m[4] * sx[i] + m[5] - dx[i]
        e = ey * ey + ex * ex
        if e < threshold2:
            cost += e
    return cost


@numba.njit(cache=True, nogil=True)
def best_hypothesis(sy, sx, dy, dx, threshold2, budget, exhaustive, confidence, seed, degenerate_ratio):
    """The best affine hypothesis over at most ``budget`` 3-samples of the matches (sy, sx) -> (dy, dx)
    (contiguous float64, n >= 3): (model (6,) as in solve_triplet, its inlier count, trials drawn).

    ``exhaustive``: the samples are every triplet in lexicographic order (``budget`` is then C(n, 3))
    and the seed is unused; otherwise random triplets from splitmix64 started at ``seed`` (uint64).
    Degenerate samples (source or destination triangle, see _triangle_ok) count as trials and are
    skipped. Best: most inliers, ties to the smaller inlier cost, then to the earlier hypothesis. Stops
    when every match is an inlier or, when sampling, once the trials reach required_trials of the best
    count (re-computed after each improvement). Count 0 when no sample was usable.
    """
    n = sy.shape[0]
    state = seed
    model = np.empty(6)
    best = np.zeros(6)
    best_count, best_cost, limit = 0, np.inf, np.inf
    i, j, k = 0, 1, 2  # the next triplet in exhaustive order
    trials = 0
    while trials < budget and trials < limit:
        trials += 1
        if exhaustive:
            a, b, c = i, j, k
            i, j, k = next_triplet(i, j, k, n)
        else:
            state, a, b, c = draw_triplet(state, n)
        if not (_triangle_ok(sy, sx, a, b, c, degenerate_ratio) and _triangle_ok(dy, dx, a, b, c, degenerate_ratio)):
            continue
        if not solve_triplet(sy, sx, dy, dx, a, b, c, model):
            continue
        count = count_inliers(model, sy, sx, dy, dx, threshold2, max(best_count, 1))
        if count < 0:
            continue
        cost = _inlier_cost(model, sy, sx, dy, dx, threshold2)
        if count > best_count or cost < best_cost:
            if count > best_count:
                if count == n:
                    limit = 0.0
                elif not exhaustive:
                    limit = required_trials(count, n, confidence)
            best_count, best_cost = count, cost
            best[:] = model
    return best, best_count, trials


@numba.njit(cache=True, nogil=True)
def fit_affine(sy, sx, dy, dx, rows, out):
    """Least-squares affine map of the matches ``rows`` into ``out`` (6,); False when their source points
    are collinear (or fewer than 3). Centred on the rows' means, the linear part solves the 2 x 2 normal
    equations M C = D (C the source scatter, D the destination-source cross scatter); the translation
    maps the source mean onto the destination mean."""
    n = rows.shape[0]
    if n < 3:
        return False
    my = mx = ny = nx = 0.0
    for r in rows:
        my += sy[r]
        mx += sx[r]
        ny += dy[r]
        nx += dx[r]
    my, mx, ny, nx = my / n, mx / n, ny / n, nx / n
    cyy = cyx = cxx = pyy = pyx = pxy = pxx = 0.0
    for r in rows:
        ay, ax = sy[r] - my, sx[r] - mx
        by, bx = dy[r] - ny, dx[r] - nx
        cyy += ay * ay
        cyx += ay * ax
        cxx += ax * ax
        pyy += by * ay
        pyx += by * ax
        pxy += bx * ay
        pxx += bx * ax
    det = cyy * cxx - cyx * cyx
    # collinear (or coincident) source points: the scatter is singular up to round-off
    if not det > 1e-12 * (cyy + cxx) * (cyy + cxx):
        return False
    inv = 1.0 / det
    out[0] = (pyy * cxx - pyx * cyx) * inv  # [[pyy, pyx], [pxy, pxx]] @ C^-1, C^-1 = inv [[cxx, -cyx], [-cyx, cyy]]
    out[1] = (pyx * cyy - pyy * cyx) * inv
    out[3] = (pxy * cxx - pxx * cyx) * inv
    out[4] = (pxx * cyy - pxy * cyx) * inv
    out[2] = ny - out[0] * my - out[1] * mx
    out[5] = nx - out[3] * my - out[4] * mx
    return True


@numba.njit(cache=True, nogil=True)
def _mark_inliers(m, sy, sx, dy, dx, threshold2, inside):
    count = 0
    for i in range(sy.shape[0]):
        inside[i] = _is_inlier(m, sy, sx, dy, dx, i, threshold2)
        count += inside[i]
    return count


@numba.njit(cache=True, nogil=True)
def ransac(src, dst, threshold2, max_trials, confidence, seed, degenerate_ratio, refit):
    """Affine RANSAC of (N, 2) float64 matches src -> dst: (model (2, 3), inlier mask (N,), inliers,
    trials); the count is 0 (and the model zeros) when nothing was found. Matches with a non-finite
    coordinate are left out. The hypotheses are searched on coordinates centred on the means; the
    winner is moved back, scored on the original coordinates, refit on its inliers by least squares
    (``refit``) and re-scored, and the refit kept when it has at least as many inliers."""
    n_all = src.shape[0]
    rows = np.empty(n_all, np.int64)
    n = 0
    for r in range(n_all):
        if np.isfinite(src[r, 0]) and np.isfinite(src[r, 1]) and np.isfinite(dst[r, 0]) and np.isfinite(dst[r, 1]):
            rows[n] = r
            n += 1
    rows = rows[:n]
    model = np.zeros((2, 3))
    mask = np.zeros(n_all, np.bool_)
    if n < 3:
        return model, mask, 0, 0
    sy, sx, dy, dx = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    for t in range(n):
        sy[t], sx[t], dy[t], dx[t] = src[rows[t], 0], src[rows[t], 1], dst[rows[t], 0], dst[rows[t], 1]
    cy, cx, ey, ex = sy.mean(), sx.mean(), dy.mean(), dx.mean()
    csy, csx, cdy, cdx = sy - cy, sx - cx, dy - ey, dx - ex
    exhaustive = n <= _MAX_EXHAUSTIVE_N and n * (n - 1) * (n - 2) // 6 <= max_trials
    budget = n * (n - 1) * (n - 2) // 6 if exhaustive else max_trials
    best, count, trials = best_hypothesis(csy, csx, cdy, cdx, threshold2, budget, exhaustive, confidence, seed,
                                          degenerate_ratio)
    if count == 0:
        return model, mask, 0, trials
    # back to the original coordinates: t' = t + dst_centre - M src_centre
    best[2] += ey - best[0] * cy - best[1] * cx
    best[5] += ex - best[3] * cy - best[4] * cx
    inside = np.empty(n, np.bool_)
    count = _mark_inliers(best, sy, sx, dy, dx, threshold2, inside)
    if refit:
        refit_model = np.empty(6)
        if fit_affine(sy, sx, dy, dx, np.flatnonzero(inside), refit_model):
            refit_inside = np.empty(n, np.bool_)
            refit_count = _mark_inliers(refit_model, sy, sx, dy, dx, threshold2, refit_inside)
            if refit_count >= count:
                best, inside, count = refit_model, refit_inside, refit_count
    for t in range(n):
        mask[rows[t]] = inside[t]
    model[0, :] = best[:3]
    model[1, :] = best[3:]
    return model, mask, count, trials
