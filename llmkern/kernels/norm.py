"""LayerNorm / RMSNorm forward and backward kernels, with the optional fused residual add.

All kernels work on 2-D rows ``(M, N)`` whose last dim is contiguous; row strides are arguments and
row offsets are int64; everything is computed in fp32. ``norm_fwd_kernel`` / ``norm_bwd_kernel``
handle ``BLOCK_M`` rows at a time, each row whole in one ``BLOCK_N >= N`` block of registers; the
``*_wide_kernel`` versions take rows too wide for that in column chunks of ``BLOCK_N``. Absent
tensors (residual, weight, bias, ...) are switched off by ``tl.constexpr`` flags; their pointer
arguments are then placeholders that are never read. Launchers: :mod:`llmkern.backends.triton.norm`.
"""
import triton
import triton.language as tl


@triton.jit
def norm_fwd_kernel(
    X, RES, W, B, OUT, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_out, stride_res_out,
    M, N, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One tile of rows: ``h = x (+ residual)``, ``out = (h - mean) * rstd * w + b``.

    With a residual, ``h`` is rounded to RES_OUT's dtype before the statistics, so ``out`` is exactly the
    norm of the stored ``residual_out``. MEAN (LayerNorm only) and RSTD are float32 per row.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]

    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = h.to(RES_OUT.dtype.element_ty).to(tl.float32)
        tl.store(RES_OUT + rows[:, None] * stride_res_out + cols[None, :], h.to(RES_OUT.dtype.element_ty), mask=mask)

    if IS_RMS:
        xc = h
    else:
        mean = tl.sum(h, axis=1) / N
        tl.store(MEAN + rows, mean, mask=row_mask)
        xc = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(
    DY, DRES, H, W, MEAN, RSTD, DH, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_dres, stride_h, stride_dh,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of ``y = xhat * w + b`` with ``xhat = (h - mean) * rstd`` (mean = 0 for RMSNorm).

    With ``g = dy * w`` and row means ``c1 = mean(g)``, ``c2 = mean(g * xhat)``:

        LayerNorm: dh = rstd * (g - c1 - xhat * c2)
        RMSNorm:   dh = rstd * (g - xhat * c2)
        dh += dresidual_out   (the gradient reaching the stored residual_out = h)

    (``d xhat_j / d h_k = rstd * (delta_jk - 1/N - xhat_j xhat_k / N)`` for LayerNorm; the ``1/N`` term
    drops for RMSNorm.) dh is computed in fp32 and stored in DH's dtype. Program ``p`` owns rows
    ``[p * rows_per_program, (p + 1) * rows_per_program)`` and writes its fp32 sums of ``dy * xhat``
    and ``dy`` to row ``p`` of DW_PARTIAL / DB_PARTIAL (``(num_programs, N)``); the launcher sums those
    rows, so the result does not depend on timing.
    """
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N

    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros([BLOCK_N], dtype=tl.float32)

    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            xhat = (h - mean[:, None]) * rstd[:, None]  # nonzero in masked columns, where dy = 0
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        c2 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dh = (g - xhat * c2[:, None]) * rstd[:, None]
        else:
            c1 = tl.sum(g, axis=1) / N
            dh = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DRESIDUAL:
            dh += tl.load(DRES + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_mask)


@triton.jit
def norm_fwd_wide_kernel(
    X, RES, W, B, OUT, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_out, stride_res_out,
    N, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """:func:`norm_fwd_kernel` for rows too wide for registers: one row per program, in chunks of BLOCK_N.

    Pass 1 reads each chunk of ``h`` (adding and storing the residual) and merges its mean and squared
    deviation into the row's (Chan et al.'s pairwise update, as accurate as two-pass statistics);
    pass 2 re-reads ``h`` (from RES_OUT when there is a residual: the stored, rounded value) and
    writes ``out``.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mean = tl.full([], 0.0, tl.float32)
    m2 = tl.full([], 0.0, tl.float32)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        h = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(RES + row * stride_res + start + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(RES_OUT.dtype.element_ty).to(tl.float32)
            tl.store(RES_OUT + row * stride_res_out + start + cols, h.to(RES_OUT.dtype.element_ty), mask=mask)
        if IS_RMS:
            m2 += tl.sum(h * h, axis=0)
        else:
            count = tl.minimum(N - start, BLOCK_N) * 1.0
            seen = start * 1.0
            chunk_mean = tl.sum(h, axis=0) / count
            d = tl.where(mask, h - chunk_mean, 0.0)
            delta = chunk_mean - mean
            mean += delta * (count / (seen + count))
            m2 += tl.sum(d * d, axis=0) + delta * delta * (seen * count / (seen + count))
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)

    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        if HAS_RESIDUAL:
            h = tl.load(RES_OUT + row * stride_res_out + start + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = (h - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_out + start + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_wide_kernel(
    DY, DRES, H, W, MEAN, RSTD, DH, DW_PARTIAL, DB_PARTIAL, ROW_SUMS,
    stride_dy, stride_dres, stride_h, stride_dh,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """:func:`norm_bwd_kernel` (same formulas, same ownership of rows and partial sums) for rows too wide
    for registers.

    Pass 1, row by row over column chunks: ``c1 = mean(g)`` and ``c2 = mean(g * xhat)`` of each of the
    program's rows into ROW_SUMS ``(M, 2)`` fp32. Pass 2, chunk by chunk over the program's rows: dh,
    and that chunk's sums of ``dy * xhat`` and ``dy`` in registers, written to the program's row of
    DW_PARTIAL / DB_PARTIAL. Rows are read twice; the partial buffers stay ``(num_programs, N)``.
    """
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)

    for row in range(row_start, row_end):
        rstd = tl.load(RSTD + row)
        mean = tl.full([], 0.0, tl.float32)
        if not IS_RMS:
            mean = tl.load(MEAN + row)
        c1 = tl.full([], 0.0, tl.float32)
        c2 = tl.full([], 0.0, tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            h = tl.load(H + row * stride_h + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g *= tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            c1 += tl.sum(g, axis=0)
            c2 += tl.sum(g * ((h - mean) * rstd), axis=0)
        tl.store(ROW_SUMS + 2 * row, c1 / N)
        tl.store(ROW_SUMS + 2 * row + 1, c2 / N)
    tl.debug_barrier()  # pass 2's threads read the row sums other threads of this program stored

    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        if HAS_WEIGHT:
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:
            db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            mean = tl.full([], 0.0, tl.float32)
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            h = tl.load(H + row * stride_h + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = (h - mean) * rstd  # nonzero in masked columns, where dy = 0
            if HAS_WEIGHT:
                g = dy * w
            else:
                g = dy
            c2 = tl.load(ROW_SUMS + 2 * row + 1)
            if IS_RMS:
                dh = (g - xhat * c2) * rstd
            else:
                dh = (g - tl.load(ROW_SUMS + 2 * row) - xhat * c2) * rstd
            if HAS_DRESIDUAL:
                dh += tl.load(DRES + row * stride_dres + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + row * stride_dh + start + cols, dh.to(DH.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw += dy * xhat
            if HAS_BIAS:
                db += dy
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + pid * N + start + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + pid * N + start + cols, db, mask=mask)
