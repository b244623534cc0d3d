"""Flash attention (FlashAttention-2 style) kernels: forward, split-key forward + combine, backward.

Notation: Q (B, H, Lq, E), K (B, H_kv, Lk, E), V (B, H_kv, Lk, Ev), query head h reads key/value
head h // GROUP. Scores are kept in the log2 domain: ``s2 = (Q K^T * scale + bias) * log2(e)``, so
the softmax uses ``exp2``. The log-sum-exp stored for the backward is in natural log,
``lse = ln2 * (m + log2(l))``, and +inf for a row whose keys are all hidden (its output is 0).

Forward (one program per BLOCK_M query rows of one (b, h)), online softmax over key tiles::

    m' = max(m, rowmax(s2));  P = exp2(s2 - m');  l = l * exp2(m - m') + rowsum(P)
    acc = acc * exp2(m - m') + (P * Z) @ V;      O = acc / l / (1 - dropout_p)

Key tiles that are entirely hidden by causality are skipped; tiles entirely visible and inside Lk
run without boundary/causal masks (``BOUNDARY=False``); the rest (the diagonal, the last tile) are
masked. A user mask (bool: keep where != 0; float: added to the scores) is streamed tile by tile
through its strides (zero for broadcast dims). Z is the dropout keep mask: element (b, h, i, j)
is kept iff ``tl.rand(seed, ((b * H + h) * Lq + i) * Lk + j) >= dropout_p``; the backward
regenerates it from the same counters (see ``llmkern.reference.attention.dropout_keep``).

Split-key forward (flash-decoding, for short Lq and long Lk): program axis 2 takes a range of
``split_size`` keys and writes its normalised partial output and its log2-domain lse; the combine
kernel merges the splits: ``lse = log2(sum_s exp2(lse_s))``, ``O = sum_s exp2(lse_s - lse) O_s``.

Backward, with ``P = exp2(s2 - lse * log2(e))`` recomputed, ``Z' = Z / (1 - dropout_p)`` and
``D = rowsum(dO * O)`` (preprocess kernel)::

    dV = (P Z')^T dO,   dP = (dO V^T) Z',   dS = P (dP - D),   dQ = scale dS K,   dK = scale dS^T Q

(``rowsum(P * dP) = rowsum(dO * O)`` because ``O = (P Z') V``.) One kernel computes dK, dV for a
tile of keys looping over the queries of all GROUP query heads that share the key head (the GQA
sum happens in registers: no atomics, deterministic); another computes dQ for a tile of queries.
Rows past Lq read q = dO = 0, lse = +inf, so their P and dS vanish; keys past Lk read k = v = 0 and
their dK, dV rows are never stored. Mask tiles are read with row/column indices clamped to the last
valid one (no load predicates), so every kernel needs Lq, Lk >= 1; the launchers never see empty inputs.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a tile, masking only the axes that can be out of bounds (zeros there)."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _add_user_mask(s2, mask_ptrs, MASK_KIND: tl.constexpr):
    """Apply a streamed user mask tile to log2-domain scores: 1 = bool (keep where != 0), 2 = additive float.

    ``mask_ptrs`` address in-bounds elements only (out-of-range rows/columns are clamped to the last
    one; the caller hides those scores), so the load needs no predicate.
    """
    if MASK_KIND == 1:
        s2 = tl.where(tl.load(mask_ptrs) != 0, s2, float("-inf"))
    elif MASK_KIND == 2:
        s2 = s2 + tl.load(mask_ptrs).to(tl.float32) * LOG2E
    return s2


@triton.jit
def _row_scores(q, k, start_n, offs_m, offs_n, n_ok, Lk, mask_base, mask_rows, stride_mn, qk_scale,
                BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Log2-domain scores (BLOCK_M, BLOCK_N) of a query tile against the key tile at ``start_n``: the
    scaled dot products, the streamed user mask, and -inf where a key is past Lk or (causal) after
    its query. The forward pass and the dQ pass recompute them alike."""
    s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK_KIND != 0:
        cols = tl.minimum(offs_n, Lk - 1) - start_n
        s2 = _add_user_mask(s2, mask_base + start_n.to(tl.int64) * stride_mn + mask_rows[:, None]
                            + cols[None, :] * stride_mn, MASK_KIND)
    if BOUNDARY:
        visible = n_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s2 = tl.where(visible, s2, float("-inf"))
    return s2


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, k_off, v_base, v_off, mask_base, mask_rows, lo, hi,
               offs_m, offs_n0, d_ok, dv_ok, Lq, Lk, stride_kn, stride_vn, stride_mn,
               qk_scale, dropout_p, seed, rng_base,
               BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               DROPOUT: tl.constexpr, GUARD: tl.constexpr, CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over the key tiles [lo, hi); see the module docstring.

    Tiles are addressed as scalar base pointer (int64 arithmetic) + int32 in-tile offsets.
    """
    m_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        n64 = start_n.to(tl.int64)
        k = _load_2d(k_base + n64 * stride_kn + k_off, n_ok, d_ok, BOUNDARY, CHECK_D)
        s2 = _row_scores(q, k, start_n, offs_m, offs_n, n_ok, Lk, mask_base, mask_rows, stride_mn, qk_scale,
                         BOUNDARY, IS_CAUSAL, MASK_KIND, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        if GUARD:  # a row may have seen only hidden keys so far: keep exp2 away from (-inf) - (-inf)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.exp2(s2 - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            rng = rng_base + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :]
            p = tl.where(tl.rand(seed, rng) >= dropout_p, p, 0.0)
        v = _load_2d(v_base + n64 * stride_vn + v_off, n_ok, dv_ok, BOUNDARY, CHECK_DV)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Lq, Lk, split_size, qk_scale, dropout_p, seed,
    Lq_key, Lk_key,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * H, n_splits). qk_scale = scale * log2(e).

    SPLIT=False: Out (B, H, Lq, Ev) in the input dtype, Lse (B, H, Lq) fp32 natural log.
    SPLIT=True: Out (n_splits, B, H, Lq, Ev) fp32 partial outputs (normalised within the split),
    Lse (n_splits, B, H, Lq) fp32 log2-domain partial lse (-inf when the split saw no visible key).
    Lq_key / Lk_key are only autotuning keys (length buckets).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    kv_h = h // GROUP
    start_m = pid_m * BLOCK_M
    m64 = start_m.to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    CHECK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    CHECK_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V

    k_base = K + b * stride_kb + kv_h * stride_kh
    k_off = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kv_h * stride_vh
    v_off = offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_base = Mask + b * stride_mb + h * stride_mh + m64 * stride_mm
    mask_rows = (tl.minimum(offs_m, Lq - 1) - start_m) * stride_mm
    rng_base = (bh * Lq) * Lk

    q = _load_2d(Q + b * stride_qb + h * stride_qh + m64 * stride_qm + offs_m0[:, None] * stride_qm
                 + offs_d[None, :] * stride_qd, m_ok, d_ok, True, CHECK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if SPLIT:
        lo = split * split_size
        hi = tl.minimum(Lk, lo + split_size)
    else:
        lo = 0
        hi = Lk
    if IS_CAUSAL:  # key j is visible to query i iff j <= i: nothing past the block's last row
        hi = tl.minimum(hi, start_m + BLOCK_M)
    hi = tl.maximum(hi, lo)
    n_full = (hi - lo) // BLOCK_N
    if IS_CAUSAL:  # a tile is fully visible iff its last key <= the block's first row
        n_full = tl.minimum(n_full, tl.maximum(start_m + 1 - lo, 0) // BLOCK_N)
    mid = lo + n_full * BLOCK_N
    GUARD: tl.constexpr = MASK_KIND != 0 or SPLIT
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, k_off, v_base, v_off, mask_base, mask_rows, lo, mid,
                               offs_m, offs_n0, d_ok, dv_ok,
                               Lq, Lk, stride_kn, stride_vn, stride_mn, qk_scale, dropout_p, seed, rng_base,
                               False, IS_CAUSAL, MASK_KIND, DROPOUT, GUARD, CHECK_D, CHECK_DV, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, k_off, v_base, v_off, mask_base, mask_rows, mid, hi,
                               offs_m, offs_n0, d_ok, dv_ok,
                               Lq, Lk, stride_kn, stride_vn, stride_mn, qk_scale, dropout_p, seed, rng_base,
                               True, IS_CAUSAL, MASK_KIND, DROPOUT, GUARD, CHECK_D, CHECK_DV, BLOCK_N, DOT_PRECISION)

    if DROPOUT:
        keep_scale = 1.0 / (1.0 - dropout_p)
    else:
        keep_scale = 1.0
    if GUARD:
        dead = l_i == 0.0
        out = acc * (keep_scale / tl.where(dead, 1.0, l_i))[:, None]
        lse2 = tl.where(dead, float("-inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
    else:
        out = acc * (keep_scale / l_i)[:, None]
        lse2 = m_i + tl.log2(l_i)

    o_ptrs = Out + split.to(tl.int64) * stride_os + b * stride_ob + h * stride_oh + m64 * stride_om \
        + offs_m0[:, None] * stride_om + offs_dv[None, :] * stride_od
    lse_ptrs = Lse + (split.to(tl.int64) * tl.num_programs(1) + bh) * Lq + offs_m
    if SPLIT:
        tl.store(o_ptrs, out, mask=m_ok[:, None] & dv_ok[None, :])
        tl.store(lse_ptrs, lse2, mask=m_ok)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
        lse = tl.where(lse2 == float("-inf"), float("inf"), lse2 * LN2)
        tl.store(lse_ptrs, lse, mask=m_ok)


@triton.jit
def attention_combine_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, n_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (Lq, B * H): merge the split partials of one query row (layouts of attention_fwd_kernel, SPLIT=True)."""
    m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    n_rows = tl.num_programs(1).to(tl.int64) * Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_splits
    row = bh * Lq + m
    lse_s = tl.load(LsePart + offs_s.to(tl.int64) * n_rows + row, mask=s_ok, other=float("-inf"))
    m_max = tl.max(lse_s, 0)
    dead = m_max == float("-inf")
    w = tl.exp2(lse_s - tl.where(dead, 0.0, m_max))
    total = tl.sum(w, 0)
    scale = 1.0 / tl.where(dead, 1.0, total)
    out = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, n_splits):
        w_s = tl.exp2(tl.load(LsePart + s * n_rows + row) - tl.where(dead, 0.0, m_max))
        o_s = tl.load(OutPart + (s * n_rows + row) * HEAD_DIM_V + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0)
        out += o_s * (w_s * scale)
    b = bh // H
    h = bh % H
    tl.store(Out + b * stride_ob + h * stride_oh + m * stride_om + offs_dv * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    lse = tl.where(dead, float("inf"), (m_max + tl.log2(tl.where(dead, 1.0, total))) * LN2)
    tl.store(Lse + row, lse)


@triton.jit
def attention_bwd_preprocess_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Lq,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * H): Delta (B, H, Lq) fp32 = rowsum(dO * O)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m < Lq)[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(dOut + b * stride_gb + h * stride_gh + rows * stride_gm + offs_dv[None, :] * stride_gd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, q_off, do_base, do_off, mask_base, mask_keys, lse_ptr, delta_ptr, lo, hi,
                offs_n, offs_m0, d_ok, dv_ok, Lq, Lk, stride_qm, stride_gm, stride_mm,
                qk_scale, dropout_p, seed, rng_base,
                CAUSAL_TILE: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles [lo, hi) of one query head (transposed scores)."""
    n_ok = offs_n < Lk
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        m_ok = offs_m < Lq
        m64 = start_m.to(tl.int64)
        q = _load_2d(q_base + m64 * stride_qm + q_off, m_ok, d_ok, True, CHECK_D)
        do = _load_2d(do_base + m64 * stride_gm + do_off, m_ok, dv_ok, True, CHECK_DV)
        lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        s2t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASK_KIND != 0:
            cols = tl.minimum(offs_m, Lq - 1) - start_m
            s2t = _add_user_mask(s2t, mask_base + m64 * stride_mm + mask_keys[:, None] + cols[None, :] * stride_mm,
                                 MASK_KIND)
        if CAUSAL_TILE:
            s2t = tl.where(offs_n[:, None] <= offs_m[None, :], s2t, float("-inf"))
        pt = tl.exp2(s2t - lse2[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            rng = rng_base + offs_m[None, :].to(tl.int64) * Lk + offs_n[:, None]
            keep = tl.rand(seed, rng) >= dropout_p
            inv_keep = 1.0 / (1.0 - dropout_p)
            pt_drop = tl.where(keep, pt * inv_keep, 0.0)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            pt_drop = pt
        dv = tl.dot(pt_drop.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, Mask, dOut, Lse, Delta, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, GROUP, Lq, Lk, qk_scale, sm_scale, dropout_p, seed,
    Lq_key, Lk_key,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Lk, BLOCK_N), B * H_kv): dK, dV of BLOCK_N keys, summed over the GROUP query heads."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    h_kv = H // GROUP
    b = bhk // h_kv
    kv_h = bhk % h_kv
    start_n = pid_n * BLOCK_N
    n64 = start_n.to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Lk
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    CHECK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    CHECK_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V

    k = _load_2d(K + b * stride_kb + kv_h * stride_kh + n64 * stride_kn + offs_n0[:, None] * stride_kn
                 + offs_d[None, :] * stride_kd, n_ok, d_ok, True, CHECK_D)
    v = _load_2d(V + b * stride_vb + kv_h * stride_vh + n64 * stride_vn + offs_n0[:, None] * stride_vn
                 + offs_dv[None, :] * stride_vd, n_ok, dv_ok, True, CHECK_DV)
    q_off = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_off = offs_m0[:, None] * stride_gm + offs_dv[None, :] * stride_gd
    mask_keys = (tl.minimum(offs_n, Lk - 1) - start_n) * stride_mn
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query tiles: causal ones start at the tile holding row start_n; those below the diagonal need no mask.
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - lo, 0), BLOCK_M) * BLOCK_M,
                         tl.cdiv(Lq, BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    hi = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = kv_h * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dOut + b * stride_gb + h * stride_gh
        mask_base = Mask + b * stride_mb + h * stride_mh + n64 * stride_mn
        rng_base = (bh * Lq) * Lk
        if IS_CAUSAL:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, q_off, do_base, do_off, mask_base, mask_keys,
                                 Lse + bh * Lq, Delta + bh * Lq, lo, mid,
                                 offs_n, offs_m0, d_ok, dv_ok, Lq, Lk, stride_qm, stride_gm, stride_mm,
                                 qk_scale, dropout_p, seed, rng_base,
                                 True, MASK_KIND, DROPOUT, CHECK_D, CHECK_DV, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, q_off, do_base, do_off, mask_base, mask_keys,
                             Lse + bh * Lq, Delta + bh * Lq, mid, hi,
                             offs_n, offs_m0, d_ok, dv_ok, Lq, Lk, stride_qm, stride_gm, stride_mm,
                             qk_scale, dropout_p, seed, rng_base,
                             False, MASK_KIND, DROPOUT, CHECK_D, CHECK_DV, BLOCK_M, DOT_PRECISION)

    store_ok_d = n_ok[:, None] & d_ok[None, :]
    store_ok_dv = n_ok[:, None] & dv_ok[None, :]
    tl.store(dK + b * stride_dkb + kv_h * stride_dkh + n64 * stride_dkn + offs_n0[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(dK.dtype.element_ty), mask=store_ok_d)
    tl.store(dV + b * stride_dvb + kv_h * stride_dvh + n64 * stride_dvn + offs_n0[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(dV.dtype.element_ty), mask=store_ok_dv)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, k_off, v_base, v_off, mask_base, mask_rows, lo, hi,
              offs_m, offs_n0, d_ok, dv_ok, Lq, Lk, stride_kn, stride_vn, stride_mn,
              qk_scale, dropout_p, seed, rng_base,
              BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over the key tiles [lo, hi)."""
    m_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        n64 = start_n.to(tl.int64)
        k = _load_2d(k_base + n64 * stride_kn + k_off, n_ok, d_ok, BOUNDARY, CHECK_D)
        v = _load_2d(v_base + n64 * stride_vn + v_off, n_ok, dv_ok, BOUNDARY, CHECK_DV)
        s2 = _row_scores(q, k, start_n, offs_m, offs_n, n_ok, Lk, mask_base, mask_rows, stride_mn, qk_scale,
                         BOUNDARY, IS_CAUSAL, MASK_KIND, DOT_PRECISION)
        p = tl.exp2(s2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            rng = rng_base + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :]
            keep = tl.rand(seed, rng) >= dropout_p
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, Mask, dOut, Lse, Delta, dQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, Lq, Lk, qk_scale, sm_scale, dropout_p, seed,
    Lq_key, Lk_key,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * H): dQ of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kv_h = h // GROUP
    start_m = pid_m * BLOCK_M
    m64 = start_m.to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    CHECK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    CHECK_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V

    q = _load_2d(Q + b * stride_qb + h * stride_qh + m64 * stride_qm + offs_m0[:, None] * stride_qm
                 + offs_d[None, :] * stride_qd, m_ok, d_ok, True, CHECK_D)
    do = _load_2d(dOut + b * stride_gb + h * stride_gh + m64 * stride_gm + offs_m0[:, None] * stride_gm
                  + offs_dv[None, :] * stride_gd, m_ok, dv_ok, True, CHECK_DV)
    lse2 = tl.load(Lse + bh * Lq + offs_m, mask=m_ok, other=float("inf")) * LOG2E
    delta = tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    k_off = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kv_h * stride_vh
    v_off = offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_base = Mask + b * stride_mb + h * stride_mh + m64 * stride_mm
    mask_rows = (tl.minimum(offs_m, Lq - 1) - start_m) * stride_mm
    rng_base = (bh * Lq) * Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    n_full = hi // BLOCK_N
    if IS_CAUSAL:
        n_full = tl.minimum(n_full, (start_m + 1) // BLOCK_N)
    mid = n_full * BLOCK_N
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, k_off, v_base, v_off, mask_base, mask_rows, 0, mid,
                   offs_m, offs_n0, d_ok, dv_ok,
                   Lq, Lk, stride_kn, stride_vn, stride_mn, qk_scale, dropout_p, seed, rng_base,
                   False, IS_CAUSAL, MASK_KIND, DROPOUT, CHECK_D, CHECK_DV, BLOCK_N, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, k_off, v_base, v_off, mask_base, mask_rows, mid, hi,
                   offs_m, offs_n0, d_ok, dv_ok,
                   Lq, Lk, stride_kn, stride_vn, stride_mn, qk_scale, dropout_p, seed, rng_base,
                   True, IS_CAUSAL, MASK_KIND, DROPOUT, CHECK_D, CHECK_DV, BLOCK_N, DOT_PRECISION)
    tl.store(dQ + b * stride_dqb + h * stride_dqh + m64 * stride_dqm + offs_m0[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(dQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
