"""The compiled TIES kernels (numba), defined at module level so that numba caches them next to this file; see
:mod:`mergelab.engine.ties_native` (which imports this module in a background thread: importing numba and
loading the cache take about a second)."""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic, overload

_BLOCK = 1024  # entries per block of the compiled loops (their buffers stay in the L1/L2 cache)


@intrinsic
def _u32_as_f32(typingctx, x):
    if not isinstance(x, types.Integer):
        return None
    sig = types.float32(x)

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = context.get_value_type(types.uint32)
        if x.bitwidth > 32:
            v = builder.trunc(v, i32)
        elif x.bitwidth < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, x):
    if x != types.float32:
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return sig, codegen


def _load(a, i):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_load, inline="always")
def _ol_load(a, i):
    if a.dtype == types.uint16:  # bf16 bits
        return lambda a, i: _u32_as_f32(np.uint32(a[i]) << np.uint32(16))
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


def _store(a, i, v):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_store, inline="always")
def _ol_store(a, i, v):
    if a.dtype == types.uint16:  # float32 -> bf16, round to nearest even (NaN -> the quiet NaN), as torch

        def store_bf16(a, i, v):
            u = _f32_bits(v)
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            a[i] = np.uint16(np.uint32(0x7FC0) if v != v else r)

        return store_bf16
    if a.dtype == types.float32:

        def store_f32(a, i, v):
            a[i] = v

        return store_f32
    return None


jit = numba.njit(nogil=True, cache=True, error_model="numpy")
# The loops run over blocks of _BLOCK entries, one expert at a time, into small buffers, and every per-entry
# choice is arithmetic (a 0/1 factor), not a branch, so that LLVM vectorises them: with TIES's random trims and
# signs a branch mispredicts on a large share of the entries. Float sums that only feed the report (the norms)
# may be reassociated (``_sumsq``); the merged values use the torch form's operations in its order.


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _sumsq(buf, m):
    s = 0.0
    for t in range(m):
        v = np.float64(buf[t])
        s += v * v
    return s


@jit
def high_pass(b, e, a0, a1, hist, acc):
    """Expert ``e``'s entries ``a0:a1``: ``hist[key] += 1`` per ``|e - b|`` (float32 bits; key = high 16 bits, +
    2^15 when the low 16 are not 0), ``acc[0] += sum of squares`` (float64), ``acc[1] = 1`` if any is non-zero."""
    db = np.empty(_BLOCK, dtype=np.float32)
    kb = np.empty(_BLOCK, dtype=np.uint32)
    nz = np.uint32(0)
    sq = 0.0
    for i0 in range(a0, a1, _BLOCK):
        m = min(_BLOCK, a1 - i0)
        ev, bv = e[i0 : i0 + m], b[i0 : i0 + m]  # indexed from 0 by the loop: no negative-index checks
        for t in range(m):
            d = _load(ev, t) - _load(bv, t)
            db[t] = d
            u = _f32_bits(abs(d))
            nz |= u
            kb[t] = (u >> np.uint32(16)) | (np.uint32((u & np.uint32(0xFFFF)) != np.uint32(0)) << np.uint32(15))
        for t in range(m):
            hist[kb[t]] += 1
        sq += _sumsq(db, m)
    acc[0] += sq
    if nz:
        acc[1] = 1.0


@jit
def bracket_pass(b, e, a0, a1, lo, hi, cand, state, acc):
    """Expert ``e``'s entries ``a0:a1`` against a bracket ``[lo, hi]`` of magnitudes: ``state[0] +=`` how many
    ``|e - b|`` (float32) are below ``lo``; those inside go to ``cand[state[1]:]`` (``state[1] +=`` their count; past
    ``len(cand)`` they are only counted, in ``state[2]``); ``acc[0] += sum of squares`` (float64), ``acc[1] = 1`` if
    any is non-zero. The selection's cheap form: when the threshold's rank falls inside the bracket, it is the
    right order statistic of the few candidates."""
    db = np.empty(_BLOCK, dtype=np.float32)
    fb = np.zeros(_BLOCK, dtype=np.uint8)  # 1 where an entry is inside the bracket
    fw = fb.view(np.uint64)  # eight flags at a time: most words are 0 and skipped
    cap = len(cand)
    nc = state[1]
    over = state[2]
    below = 0
    nz = np.uint32(0)
    sq = 0.0
    for i0 in range(a0, a1, _BLOCK):
        m = min(_BLOCK, a1 - i0)
        inside = 0
        ev, bv = e[i0 : i0 + m], b[i0 : i0 + m]  # indexed from 0 by the loop: no negative-index checks
        for t in range(m):
            d = _load(ev, t) - _load(bv, t)
            a = abs(d)
            db[t] = d
            nz |= _f32_bits(a)
            below += np.int64(a < lo)
            f = np.uint8((a >= lo) & (a <= hi))
            fb[t] = f
            inside += np.int64(f)
        sq += _sumsq(db, m)
        if inside:  # the flagged entries, by the set bits of each word (a branch per entry mispredicts)
            for t in range(m, (m + 7) // 8 * 8):
                fb[t] = 0
            for w in range((m + 7) // 8):
                x = fw[w]
                while x:
                    t = w * 8 + (trailing_zeros(x) >> 3)
                    if nc < cap:
                        cand[nc] = abs(db[t])
                        nc += 1
                    else:
                        over += 1
                    x &= x - np.uint64(1)
    state[0] += below
    state[1] = nc
    state[2] = over
    acc[0] += sq
    if nz:
        acc[1] = 1.0


@jit
def low_pass(b, e, a0, a1, bucket, low):
    """``low[bits & 0xFFFF] += 1`` for the entries ``a0:a1`` of ``|e - b|`` whose high 16 bits are ``bucket``."""
    bk = np.uint32(bucket)
    for i in range(a0, a1):
        u = _f32_bits(abs(_load(e, i) - _load(b, i)))
        if (u >> np.uint32(16)) == bk:
            low[u & np.uint32(0xFFFF)] += 1


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _trim(d, h):
    """The task-vector entry ``d`` kept where ``|d| >= h``, else +-0 (a 0/1 factor, not a branch)."""
    return d * np.float32(abs(d) >= h)


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _agree(d, sg):
    """``(relu(d * sg), 1.0 if it is > 0 else 0.0)``: an entry's share of the disjoint mean and its count."""
    v = d * sg
    p = np.float32(v > np.float32(0.0))
    return v * p, p


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _update(o, c, sg, lam):
    """The disjoint mean ``o / max(c, 1)``, * sign, + 0 (no -0), * lam (exact when 1)."""
    return (o / max(c, np.float32(1.0)) * sg + np.float32(0.0)) * lam


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _tail_sum(xb, t, n, sg, agreeing):
    """Column ``t`` of ``xb`` summed over the experts in the order torch's ``sum(dim=0)`` uses for the columns
    after its last full vector group (with five or more rows): four accumulators taking rows round robin, the
    rows past the last multiple of four added to the first, then ``((a0 + a1) + a2) + a3``. With ``agreeing``,
    the values ``relu(x * sg)`` instead of ``x``."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    full = n - n % 4
    for r in range(n):
        v = xb[r, t]
        if agreeing:
            v = v * sg
            v = v * np.float32(v > np.float32(0.0))
        j = r % 4 if r < full else 0
        if j == 0:
            a0 = a0 + v
        elif j == 1:
            a1 = a1 + v
        elif j == 2:
            a2 = a2 + v
        else:
            a3 = a3 + v
    return ((a0 + a1) + a2) + a3


@jit
def _block(b, es, i0, m, th, lam, tail, out, bb, xb, sb, nb, ob, cb, ub, fb):
    """Merge entries ``i0:i0+m`` into ``out`` under the elected sign ``sign(sum)``; sums over the experts of entries
    from index ``tail`` on take torch's tail order (:func:`_tail_sum`). Returns (balance of the sums' signs,
    entries waiting for the majority sign (flagged in ``fb``), non-finite updates, sum of squared updates)."""
    n = len(es)
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]  # indexed from 0 by the loops: no negative-index checks
    for t in range(m):
        bb[t] = _load(bv, t)
    for r in range(n):  # trimmed task vectors (|d| >= th kept), their sum in the experts' order, non-zeros
        ev = es[r][i0 : i0 + m]
        thr = th[r]
        for t in range(m):
            d = _trim(_load(ev, t) - bb[t], thr)
            xb[r, t] = d
            if r == 0:
                sb[t] = d
                nb[t] = np.int32(d != np.float32(0.0))
            else:
                sb[t] = sb[t] + d
                nb[t] += np.int32(d != np.float32(0.0))
    t0 = max(0, tail - i0)
    for t in range(t0, m):
        sb[t] = _tail_sum(xb, t, n, np.float32(1.0), False)
    bal = 0
    waiting = 0
    for t in range(m):
        s = sb[t]
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nb[t] > 0)
        fb[t] = w
        waiting += w
        sb[t] = np.float32(pos - neg)  # the elected sign (0 for a waiting entry)
        ob[t] = np.float32(0.0)
        cb[t] = np.float32(0.0)
    for r in range(n):  # the agreeing values summed in the experts' order (+-0 for the others) and counted
        for t in range(m):
            a, p = _agree(xb[r, t], sb[t])
            ob[t] = ob[t] + a
            cb[t] = cb[t] + p
    for t in range(t0, m):
        ob[t] = _tail_sum(xb, t, n, sb[t], True)
    big = np.float32(3.4028234663852886e38)
    bad = 0
    for t in range(m):  # the update, + base, converted
        upd = _update(ob[t], cb[t], sb[t], lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + bb[t])
    return bal, waiting, bad, _sumsq(ub, m)


def _fixed_block(b, es, i0, m, th, lam, out, ub, fb):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_fixed_block)
def _ol_fixed_block(b, es, i0, m, th, lam, out, ub, fb):
    """The generated block (``BLOCKS``, below) for this many experts, chosen when the caller compiles (none outside
    2 to 8: :func:`merge_pass` then uses :func:`_block`)."""
    block = BLOCKS.get(len(es)) if isinstance(es, types.UniTuple) else None
    if block is None:
        return lambda b, es, i0, m, th, lam, out, ub, fb: (np.int64(0), np.int64(0), np.int64(0), 0.0)
    return lambda b, es, i0, m, th, lam, out, ub, fb: block(b, es, i0, m, th, lam, out, ub, fb)


@jit
def merge_pass(b, es, a0, a1, th, lam, tail, out, amb, ambx, state, acc):
    """Entries ``a0:a1`` merged into ``out`` (output dtype): trim, elect ``sign(sum)``, disjoint mean, ``*
    lam``, ``+ base``, converted. An entry whose sum is 0 while some trimmed value is not waits for the majority
    sign: it is written as if no value agreed, its index goes to ``amb[state[0]]`` and its base value and trimmed
    task vectors to ``ambx[state[0]]`` (``state[0] += 1``), and :func:`patch_pass` finishes it from those (without
    reading the inputs again: the waiting entries are spread over every page). ``state[1] += sign`` of every sum
    (the balance); ``acc[0] += upd^2`` (float64), ``acc[1] +=`` the count of non-finite updates. Blocks before the
    sums' tail take the fixed-count block (``BLOCKS``, generated below) for 2 to 8 experts."""
    n = len(es)
    fixed = 2 <= n <= 8
    bufs = (np.empty(_BLOCK, dtype=np.float32), np.empty((n, _BLOCK), dtype=np.float32),
            np.empty(_BLOCK, dtype=np.float32), np.empty(_BLOCK, dtype=np.int32),
            np.empty(_BLOCK, dtype=np.float32), np.empty(_BLOCK, dtype=np.float32),
            np.empty(_BLOCK, dtype=np.float32), np.zeros(_BLOCK, dtype=np.uint8))
    bb, xb, sb, nb, ob, cb, ub, fb = bufs
    fw = fb.view(np.uint64)  # eight flags at a time: most words are 0 and skipped
    n_amb = state[0]
    bal = 0
    bad = 0
    sq = 0.0
    for i0 in range(a0, a1, _BLOCK):
        m = min(_BLOCK, a1 - i0)
        fast = fixed and i0 + m <= tail
        if fast:
            bl, waiting, bd, s2 = _fixed_block(b, es, i0, m, th, lam, out, ub, fb)
        else:
            bl, waiting, bd, s2 = _block(b, es, i0, m, th, lam, tail, out, bb, xb, sb, nb, ob, cb, ub, fb)
        bal += bl
        bad += bd
        sq += s2
        if waiting:
            for w in range((m + 7) // 8):
                if fw[w]:
                    for t in range(w * 8, min(w * 8 + 8, m)):
                        if fb[t]:
                            amb[n_amb] = i0 + t
                            if fast:  # the fixed block keeps no buffers: the few waiting entries read again
                                x = _load(b, i0 + t)
                                ambx[n_amb, 0] = x
                                for r in range(n):
                                    ambx[n_amb, 1 + r] = _trim(_load(es[r], i0 + t) - x, th[r])
                            else:
                                ambx[n_amb, 0] = bb[t]
                                for r in range(n):
                                    ambx[n_amb, 1 + r] = xb[r, t]
                            n_amb += 1
    state[0] = n_amb
    state[1] += bal
    acc[0] += sq
    acc[1] += bad


@jit
def patch_pass(tail, lam, out, amb, ambx, n_amb, majority, acc):
    """Finish the set-aside entries ``amb[:n_amb]`` (base value and trimmed task vectors in ``ambx``) with the
    tensor's majority sign (float32 +-1 or 0), as :func:`_block` computes an entry."""
    n = ambx.shape[1] - 1
    x = np.empty((n, 1), dtype=np.float32)
    sq = 0.0
    bad = 0
    big = np.float32(3.4028234663852886e38)
    for k in range(n_amb):
        i = amb[k]
        bi = ambx[k, 0]
        for r in range(n):
            x[r, 0] = ambx[k, 1 + r]
        if i >= tail:
            o = _tail_sum(x, 0, n, majority, True)
            cnt = np.float32(0.0)
            for r in range(n):
                cnt += np.float32(x[r, 0] * majority > np.float32(0.0))
        else:
            o = np.float32(0.0)
            cnt = np.float32(0.0)
            for r in range(n):
                a, p = _agree(x[r, 0], majority)
                o = o + a
                cnt = cnt + p
        upd = _update(o, cnt, majority, lam)
        sq += np.float64(upd) * np.float64(upd)
        bad += np.int32(not abs(upd) <= big)
        _store(out, i, upd + bi)
    acc[0] += sq
    acc[1] += bad


# ---- BEGIN GENERATED by python -m mergelab.engine.ties_fixed_gen: the merge block per expert count ----
@jit
def block2(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 2 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        s = d0
        s = s + d1
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


@jit
def block3(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 3 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    v2 = es[2][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    h2 = th[2]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        d2 = _trim(_load(v2, t) - x, h2)
        s = d0
        s = s + d1
        s = s + d2
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0)) + np.int32(d2 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        a2, p2 = _agree(d2, sg)
        o = o + a2
        c = c + p2
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


@jit
def block4(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 4 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    v2 = es[2][i0 : i0 + m]
    v3 = es[3][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    h2 = th[2]
    h3 = th[3]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        d2 = _trim(_load(v2, t) - x, h2)
        d3 = _trim(_load(v3, t) - x, h3)
        s = d0
        s = s + d1
        s = s + d2
        s = s + d3
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0)) + np.int32(d2 != np.float32(0.0)) + np.int32(d3 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        a2, p2 = _agree(d2, sg)
        o = o + a2
        c = c + p2
        a3, p3 = _agree(d3, sg)
        o = o + a3
        c = c + p3
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


@jit
def block5(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 5 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    v2 = es[2][i0 : i0 + m]
    v3 = es[3][i0 : i0 + m]
    v4 = es[4][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    h2 = th[2]
    h3 = th[3]
    h4 = th[4]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        d2 = _trim(_load(v2, t) - x, h2)
        d3 = _trim(_load(v3, t) - x, h3)
        d4 = _trim(_load(v4, t) - x, h4)
        s = d0
        s = s + d1
        s = s + d2
        s = s + d3
        s = s + d4
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0)) + np.int32(d2 != np.float32(0.0)) + np.int32(d3 != np.float32(0.0)) + np.int32(d4 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        a2, p2 = _agree(d2, sg)
        o = o + a2
        c = c + p2
        a3, p3 = _agree(d3, sg)
        o = o + a3
        c = c + p3
        a4, p4 = _agree(d4, sg)
        o = o + a4
        c = c + p4
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


@jit
def block6(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 6 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    v2 = es[2][i0 : i0 + m]
    v3 = es[3][i0 : i0 + m]
    v4 = es[4][i0 : i0 + m]
    v5 = es[5][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    h2 = th[2]
    h3 = th[3]
    h4 = th[4]
    h5 = th[5]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        d2 = _trim(_load(v2, t) - x, h2)
        d3 = _trim(_load(v3, t) - x, h3)
        d4 = _trim(_load(v4, t) - x, h4)
        d5 = _trim(_load(v5, t) - x, h5)
        s = d0
        s = s + d1
        s = s + d2
        s = s + d3
        s = s + d4
        s = s + d5
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0)) + np.int32(d2 != np.float32(0.0)) + np.int32(d3 != np.float32(0.0)) + np.int32(d4 != np.float32(0.0)) + np.int32(d5 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        a2, p2 = _agree(d2, sg)
        o = o + a2
        c = c + p2
        a3, p3 = _agree(d3, sg)
        o = o + a3
        c = c + p3
        a4, p4 = _agree(d4, sg)
        o = o + a4
        c = c + p4
        a5, p5 = _agree(d5, sg)
        o = o + a5
        c = c + p5
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


@jit
def block7(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 7 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    v2 = es[2][i0 : i0 + m]
    v3 = es[3][i0 : i0 + m]
    v4 = es[4][i0 : i0 + m]
    v5 = es[5][i0 : i0 + m]
    v6 = es[6][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    h2 = th[2]
    h3 = th[3]
    h4 = th[4]
    h5 = th[5]
    h6 = th[6]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        d2 = _trim(_load(v2, t) - x, h2)
        d3 = _trim(_load(v3, t) - x, h3)
        d4 = _trim(_load(v4, t) - x, h4)
        d5 = _trim(_load(v5, t) - x, h5)
        d6 = _trim(_load(v6, t) - x, h6)
        s = d0
        s = s + d1
        s = s + d2
        s = s + d3
        s = s + d4
        s = s + d5
        s = s + d6
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0)) + np.int32(d2 != np.float32(0.0)) + np.int32(d3 != np.float32(0.0)) + np.int32(d4 != np.float32(0.0)) + np.int32(d5 != np.float32(0.0)) + np.int32(d6 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        a2, p2 = _agree(d2, sg)
        o = o + a2
        c = c + p2
        a3, p3 = _agree(d3, sg)
        o = o + a3
        c = c + p3
        a4, p4 = _agree(d4, sg)
        o = o + a4
        c = c + p4
        a5, p5 = _agree(d5, sg)
        o = o + a5
        c = c + p5
        a6, p6 = _agree(d6, sg)
        o = o + a6
        c = c + p6
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


@jit
def block8(b, es, i0, m, th, lam, out, ub, fb):
    """Entries ``i0:i0+m`` of 8 experts: returns (sign balance, waiting entries flagged in ``fb``, non-finite
    updates, sum of squared updates), as :func:`_block`."""
    bv, ov = b[i0 : i0 + m], out[i0 : i0 + m]
    v0 = es[0][i0 : i0 + m]
    v1 = es[1][i0 : i0 + m]
    v2 = es[2][i0 : i0 + m]
    v3 = es[3][i0 : i0 + m]
    v4 = es[4][i0 : i0 + m]
    v5 = es[5][i0 : i0 + m]
    v6 = es[6][i0 : i0 + m]
    v7 = es[7][i0 : i0 + m]
    h0 = th[0]
    h1 = th[1]
    h2 = th[2]
    h3 = th[3]
    h4 = th[4]
    h5 = th[5]
    h6 = th[6]
    h7 = th[7]
    big = np.float32(3.4028234663852886e38)
    bal = np.int32(0)
    waiting = np.int32(0)
    bad = np.int32(0)
    for t in range(m):
        x = _load(bv, t)
        d0 = _trim(_load(v0, t) - x, h0)
        d1 = _trim(_load(v1, t) - x, h1)
        d2 = _trim(_load(v2, t) - x, h2)
        d3 = _trim(_load(v3, t) - x, h3)
        d4 = _trim(_load(v4, t) - x, h4)
        d5 = _trim(_load(v5, t) - x, h5)
        d6 = _trim(_load(v6, t) - x, h6)
        d7 = _trim(_load(v7, t) - x, h7)
        s = d0
        s = s + d1
        s = s + d2
        s = s + d3
        s = s + d4
        s = s + d5
        s = s + d6
        s = s + d7
        nz = np.int32(d0 != np.float32(0.0)) + np.int32(d1 != np.float32(0.0)) + np.int32(d2 != np.float32(0.0)) + np.int32(d3 != np.float32(0.0)) + np.int32(d4 != np.float32(0.0)) + np.int32(d5 != np.float32(0.0)) + np.int32(d6 != np.float32(0.0)) + np.int32(d7 != np.float32(0.0))
        pos = np.int32(s > np.float32(0.0))
        neg = np.int32(s < np.float32(0.0))
        bal += pos - neg
        w = np.int32((pos | neg) == 0) & np.int32(nz > 0)
        fb[t] = np.uint8(w)
        waiting += w
        sg = np.float32(pos - neg)
        o = np.float32(0.0)
        c = np.float32(0.0)
        a0, p0 = _agree(d0, sg)
        o = o + a0
        c = c + p0
        a1, p1 = _agree(d1, sg)
        o = o + a1
        c = c + p1
        a2, p2 = _agree(d2, sg)
        o = o + a2
        c = c + p2
        a3, p3 = _agree(d3, sg)
        o = o + a3
        c = c + p3
        a4, p4 = _agree(d4, sg)
        o = o + a4
        c = c + p4
        a5, p5 = _agree(d5, sg)
        o = o + a5
        c = c + p5
        a6, p6 = _agree(d6, sg)
        o = o + a6
        c = c + p6
        a7, p7 = _agree(d7, sg)
        o = o + a7
        c = c + p7
        upd = _update(o, c, sg, lam)
        ub[t] = upd
        bad += np.int32(not abs(upd) <= big)
        _store(ov, t, upd + x)
    return np.int64(bal), np.int64(waiting), np.int64(bad), _sumsq(ub, m)


BLOCKS = {2: block2, 3: block3, 4: block4, 5: block5, 6: block6, 7: block7, 8: block8}
# ---- END GENERATED ----


def _arr(kind: str, n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.uint16 if kind == "bf16" else np.float32)


def warm(n_experts: int, kind_in: str, kind_out: str) -> None:
    """Run the kernels of every merge once on tiny inputs of these types (numba compiles, or loads its cache, per
    signature); the histogram passes, needed only when a bracket misses, load when first called."""
    b = _arr(kind_in, 4)
    es = tuple(_arr(kind_in, 4) for _ in range(n_experts))
    out, acc = _arr(kind_out, 4), np.zeros(2)
    bracket_pass(b, es[0], 0, 4, np.float32(0.0), np.float32(1.0), np.zeros(8, dtype=np.float32),
                 np.zeros(3, dtype=np.int64), acc)
    th = np.zeros(n_experts, dtype=np.float32)
    amb = np.zeros(5, dtype=np.int64)
    ambx = np.zeros((5, n_experts + 1), dtype=np.float32)
    merge_pass(b, es, 0, 4, th, np.float32(1.0), 2, out, amb, ambx, np.zeros(2, dtype=np.int64), acc)
    patch_pass(2, np.float32(1.0), out, amb, ambx, 1, np.float32(1.0), acc)


__all__ = ["bracket_pass", "high_pass", "low_pass", "merge_pass", "patch_pass", "warm"]
