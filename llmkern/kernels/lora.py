"""LoRA / QLoRA linear kernels: ``out = x W^T + bias + s * (D(x) A^T) B^T`` and its backward.

Shapes: x (M, K), W (N, K) dense or NF4, A (r, K), B (N, r); ``s`` = scaling; ``D`` = LoRA dropout
(``x * keep / (1 - p)``, ``keep = tl.rand(seed, m * K + k) >= p``, regenerated, never stored).
See :mod:`llmkern.reference.lora` for the contract.

Forward, two launches::

    lora_xa_kernel:   xa = D(x) A^T                         (M, r) fp32, one program per row block
    lora_fwd_kernel:  out = x W^T + bias + s * xa B^T      one GEMM; each output tile starts its fp32
                                                           accumulator with s * xa_tile B_tile^T + bias,
                                                           then runs the K loop of x W^T on top of it:
                                                           no (M, N) LoRA temporary, no second tile

Backward, with ``g = dY B``, two launches::

    lora_bwd_dy_kernel:  g = dY B  (M, r), and per row block i the partial dB_i = dY_i^T xa_i (N, r);
                         dY is read once for both. dB = s * sum_i dB_i (deterministic, no atomics).
    lora_bwd_dx_kernel:  dX = dY W + keep/(1-p) * s * g A    (the GEMM of the forward with W read
                         untransposed). Each (row block i, column block) tile first builds the
                         dropout mask of its x block, which also gives the partial
                         dA_i = g_i^T (x_i * keep) for its columns; then the masked LoRA term seeds
                         the accumulator and the K loop of dY W runs on top of it.
                         dA = s / (1 - p) * sum_i dA_i.

NF4 weights (``NF4=True``): ``w_ptr`` holds packed uint8 nibbles (high nibble first), ``absmax_ptr``
one float32 scale per ``QBLOCK`` elements, ``code_ptr`` the 16 NF4 values. Tiles of W are
dequantized in registers inside the K loop: element ``i`` of W (row-major) is
``code[nibble(i)] * absmax[i // QBLOCK]``; no dense W is ever written. The W "strides" passed with
NF4 are element-index strides of the logical row-major (N, K) W.

Indexing: each tile's origin is an int64 scalar (pointer or element index); offsets inside a tile
are int32, so no tensor can overflow while per-element arithmetic stays 32-bit.

Every dot takes operands in the input dtype (fp16/bf16 on tensor cores; fp32 with ``PRECISION``,
``"ieee"`` or ``"tf32"``) and accumulates in fp32. The fp32 intermediates xa and g are rounded to the
input dtype where they enter a dot, as PyTorch rounds them when PEFT's layer runs in that dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped by GROUP_M row blocks so neighbours share W tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _dropout_keep(seed, row0, col0, rows, cols, row_len, p):
    """Bool tile: element (row0 + rows, col0 + cols) of the 2-D x with ``row_len`` columns survives the dropout."""
    base = row0.to(tl.int64) * row_len + col0
    return tl.rand(seed, base + (rows[:, None] * row_len + cols[None, :]).to(tl.int64)) >= p


@triton.jit
def _nf4_values(byte, code_ptr):
    """float32 NF4 values (even element = high nibble, odd = low) of int32 packed bytes."""
    return tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF))


@triton.jit
def _nf4_tile_gather(w_ptr, absmax_ptr, code_ptr, w_base, w_local, ok, QBLOCK: tl.constexpr):
    """float32 W tile of any shape and alignment: one byte and one absmax gather per element."""
    # Split the element index into a QBLOCK-aligned int64 origin and int32 in-tile offsets.
    shift = (w_base % QBLOCK).to(tl.int32)
    origin = w_base - shift
    idx = w_local + shift
    byte = tl.load(w_ptr + origin // 2 + (idx >> 1), mask=ok, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (idx & 1)) * 4)) & 0xF  # even element -> high nibble
    scale = tl.load(absmax_ptr + origin // QBLOCK + idx // QBLOCK, mask=ok, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def _nf4_tile_kmajor(w_ptr, absmax_ptr, code_ptr, w_base, cols, k_left, n_ok, row_len,
                     QBLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 tile ``T[k, n] = W[col0 + n, k0 + k]`` (forward orientation) when ``row_len % QBLOCK == 0``.

    ``w_base`` = element index of W[col0, k0]; ``k_left`` = K - k0. Each column is BLOCK_K contiguous
    elements of one W row: BLOCK_K / 2 bytes, and max(1, BLOCK_K / QBLOCK) scales.
    """
    NSUB: tl.constexpr = BLOCK_K // QBLOCK if BLOCK_K > QBLOCK else 1
    kk = tl.arange(0, BLOCK_K // 2)
    ok = (kk < k_left // 2)[:, None] & n_ok[None, :]
    byte = tl.load(w_ptr + w_base // 2 + (kk[:, None] + cols[None, :] * (row_len // 2)), mask=ok, other=0)
    hi, lo = _nf4_values(byte.to(tl.int32), code_ptr)
    w = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (BLOCK_K, BLOCK_N))  # rows 2kk (hi), 2kk + 1 (lo)
    sub = tl.arange(0, NSUB)
    s_ok = (sub * QBLOCK < k_left)[:, None] & n_ok[None, :]
    scale = tl.load(absmax_ptr + w_base // QBLOCK + (sub[:, None] + cols[None, :] * (row_len // QBLOCK)),
                    mask=s_ok, other=0.0)
    scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (NSUB, BLOCK_K // NSUB, BLOCK_N)), (BLOCK_K, BLOCK_N))
    return w * scale


@triton.jit
def _nf4_tile_nmajor(w_ptr, absmax_ptr, code_ptr, w_base, rk, k_ok, n_left, row_len,
                     QBLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 tile ``T[k, n] = W[k0 + k, col0 + n]`` (dX orientation) when ``row_len % QBLOCK == 0``.

    ``w_base`` = element index of W[k0, col0]; ``n_left`` = in_features - col0. Each tile row is
    BLOCK_N contiguous elements of one W row: BLOCK_N / 2 bytes, and max(1, BLOCK_N / QBLOCK) scales.
    """
    NSUB: tl.constexpr = BLOCK_N // QBLOCK if BLOCK_N > QBLOCK else 1
    cc = tl.arange(0, BLOCK_N // 2)
    ok = k_ok[:, None] & (cc < n_left // 2)[None, :]
    byte = tl.load(w_ptr + w_base // 2 + (rk[:, None] * (row_len // 2) + cc[None, :]), mask=ok, other=0)
    hi, lo = _nf4_values(byte.to(tl.int32), code_ptr)
    w = tl.reshape(tl.join(hi, lo), (BLOCK_K, BLOCK_N))  # columns 2cc (hi), 2cc + 1 (lo)
    sub = tl.arange(0, NSUB)
    s_ok = k_ok[:, None] & (sub * QBLOCK < n_left)[None, :]
    scale = tl.load(absmax_ptr + w_base // QBLOCK + (rk[:, None] * (row_len // QBLOCK) + sub[None, :]),
                    mask=s_ok, other=0.0)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_K, NSUB, BLOCK_N // NSUB)), (BLOCK_K, BLOCK_N))
    return w * scale


@triton.jit
def _gemm_tile(acc, a_ptr, w_ptr, absmax_ptr, code_ptr, row0, col0, M, N, K,
               stride_am, stride_ak, stride_wk, stride_wn,
               NF4: tl.constexpr, NF4_ALIGNED: tl.constexpr, W_KMAJOR: tl.constexpr, QBLOCK: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + a[row0:row0+BLOCK_M, :] @ W_op[:, col0:col0+BLOCK_N]``; ``W_op[k, n]`` at ``k*stride_wk + n*stride_wn``.

    Dense rows and columns past M / N wrap around (``%``): their addresses stay valid and they only
    feed outputs that are never stored; NF4 columns past N are masked instead. NF4: ``NF4_ALIGNED``
    (W's rows are whole QBLOCKs) takes the structured loads of ``_nf4_tile_kmajor`` (``W_KMAJOR``:
    the forward's W^T) or ``_nf4_tile_nmajor`` (the dX GEMM's W); otherwise one gather per element.
    """
    rk = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_N)
    rows = (row0 + tl.arange(0, BLOCK_M)) % M - row0
    a_ptrs = a_ptr + row0.to(tl.int64) * stride_am + (rows[:, None] * stride_am + rk[None, :] * stride_ak)
    w_base = col0.to(tl.int64) * stride_wn  # element index of W_op[k0, col0]
    n_ok = cols < N - col0
    if NF4:
        w_local = rk[:, None] * stride_wk + cols[None, :] * stride_wn
    else:
        w_local = rk[:, None] * stride_wk + ((col0 + cols) % N - col0)[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if NF4:
            if NF4_ALIGNED:
                if W_KMAJOR:
                    w = _nf4_tile_kmajor(w_ptr, absmax_ptr, code_ptr, w_base, cols, K - k0, n_ok, stride_wn,
                                         QBLOCK, BLOCK_K, BLOCK_N)
                else:
                    w = _nf4_tile_nmajor(w_ptr, absmax_ptr, code_ptr, w_base, rk, k_ok, N - col0, stride_wk,
                                         QBLOCK, BLOCK_K, BLOCK_N)
            else:
                w = _nf4_tile_gather(w_ptr, absmax_ptr, code_ptr, w_base, w_local, k_ok[:, None] & n_ok[None, :],
                                     QBLOCK)
            w = w.to(a.dtype)
        else:
            w = tl.load(w_ptr + w_base + w_local, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_base += BLOCK_K * stride_wk
    return acc


@triton.jit(do_not_specialize=["seed"])
def lora_xa_kernel(x_ptr, a_ptr, xa_ptr, M, K, R,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
                   seed, dropout_p, dropout_scale,
                   HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """xa = D(x) A^T, fp32 (M, R). Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    row0 = tl.program_id(0) * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    rows = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rows < M - row0
    r_ok = rr < R - r0
    x_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + (rows[:, None] * stride_xm + rk[None, :] * stride_xk)
    a_ptrs = a_ptr + r0 * stride_ar + (rr[None, :] * stride_ar + rk[:, None] * stride_ak)  # A^T tile (BLOCK_K, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_dropout_keep(seed, row0, k0, rows, rk, K, dropout_p), x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * dropout_scale
    xa_ptrs = xa_ptr + row0.to(tl.int64) * stride_xam + (
        r0 * stride_xar + rows[:, None] * stride_xam + rr[None, :] * stride_xar)
    tl.store(xa_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def lora_fwd_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, out_ptr,
                    M, N, K, R,
                    stride_xm, stride_xk, stride_wk, stride_wn, stride_xam, stride_xar,
                    stride_bn, stride_br, stride_om, stride_on,
                    scaling, M_BUCKET,
                    NF4: tl.constexpr, NF4_ALIGNED: tl.constexpr, QBLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x W^T + bias + scaling * xa B^T. Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).

    ``M_BUCKET`` (M rounded up to a power of two) only keys the autotuner.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rows < M - row0
    n_ok = cols < N - col0
    xa_ptrs = xa_ptr + row0.to(tl.int64) * stride_xam + (rows[:, None] * stride_xam + rr[None, :] * stride_xar)
    bt_ptrs = b_ptr + col0.to(tl.int64) * stride_bn + (rr[:, None] * stride_br + cols[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = rr < R - r0
        xa = tl.load(xa_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(bt_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot((xa * scaling).to(bt.dtype), bt, acc, input_precision=PRECISION)
        xa_ptrs += BLOCK_R * stride_xar
        bt_ptrs += BLOCK_R * stride_br
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col0 + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _gemm_tile(acc, x_ptr, w_ptr, absmax_ptr, code_ptr, row0, col0, M, N, K,
                     stride_xm, stride_xk, stride_wk, stride_wn,
                     NF4, NF4_ALIGNED, True, QBLOCK, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    out_ptrs = out_ptr + row0.to(tl.int64) * stride_om + col0.to(tl.int64) * stride_on + (
        rows[:, None] * stride_om + cols[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def lora_bwd_dy_kernel(dy_ptr, b_ptr, xa_ptr, g_ptr, dbp_ptr, M, N, R,
                       stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
                       stride_gm, stride_gr, stride_dbpi, stride_dbpn, stride_dbpr,
                       PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """g = dY B (M, R) fp32 and dbp[i] = dY_i^T xa_i (N, R) fp32 for row block i.

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)).
    """
    pid_m = tl.program_id(0)
    row0 = pid_m * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    rows = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rows < M - row0
    r_ok = rr < R - r0
    mr_ok = m_ok[:, None] & r_ok[None, :]
    xa_ptrs = xa_ptr + row0.to(tl.int64) * stride_xam + (
        r0 * stride_xar + rows[:, None] * stride_xam + rr[None, :] * stride_xar)
    xa = tl.load(xa_ptrs, mask=mr_ok, other=0.0)
    dy_ptrs = dy_ptr + row0.to(tl.int64) * stride_dym + (rows[:, None] * stride_dym + rn[None, :] * stride_dyn)
    b_ptrs = b_ptr + r0 * stride_br + (rn[:, None] * stride_bn + rr[None, :] * stride_br)
    dbp_ptrs = dbp_ptr + pid_m.to(tl.int64) * stride_dbpi + (
        r0 * stride_dbpr + rn[:, None] * stride_dbpn + rr[None, :] * stride_dbpr)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = rn < N - n0
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        part = tl.dot(tl.trans(dy), xa.to(dy.dtype), input_precision=PRECISION)
        tl.store(dbp_ptrs, part, mask=n_ok[:, None] & r_ok[None, :])
        dy_ptrs += BLOCK_N * stride_dyn
        b_ptrs += BLOCK_N * stride_bn
        dbp_ptrs += BLOCK_N * stride_dbpn
    g_ptrs = g_ptr + row0.to(tl.int64) * stride_gm + (
        r0 * stride_gr + rows[:, None] * stride_gm + rr[None, :] * stride_gr)
    tl.store(g_ptrs, g, mask=mr_ok)


@triton.jit(do_not_specialize=["seed"])
def lora_bwd_dx_kernel(dy_ptr, w_ptr, absmax_ptr, code_ptr, g_ptr, a_ptr, x_ptr, dx_ptr, dap_ptr,
                       M, N, K, R,
                       stride_dym, stride_dyk, stride_wk, stride_wn, stride_gm, stride_gr,
                       stride_ar, stride_an, stride_xm, stride_xn, stride_dxm, stride_dxn,
                       stride_dapi, stride_dapr, stride_dapn,
                       scaling, seed, dropout_p, dropout_scale, M_BUCKET,
                       NF4: tl.constexpr, NF4_ALIGNED: tl.constexpr, QBLOCK: tl.constexpr, COMPUTE_DX: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dX = dY W + keep * dropout_scale * scaling * g A, and dap[i] = g_i^T (x_i * keep).

    Here N = in_features (columns of dX and x) and K = out_features (the reduction). ``dap`` is
    (cdiv(M, BLOCK_M), R, N) fp32, one partial per row block. With ``COMPUTE_DX=False`` only the
    partials are produced. Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rows < M - row0
    n_ok = cols < N - col0
    mn_ok = m_ok[:, None] & n_ok[None, :]
    x_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + col0.to(tl.int64) * stride_xn + (
        rows[:, None] * stride_xm + cols[None, :] * stride_xn)
    x = tl.load(x_ptrs, mask=mn_ok, other=0.0)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, row0, col0, rows, cols, N, dropout_p)
        x = tl.where(keep, x, tl.zeros_like(x))
    g_ptrs = g_ptr + row0.to(tl.int64) * stride_gm + (rows[:, None] * stride_gm + rr[None, :] * stride_gr)
    a_ptrs = a_ptr + col0.to(tl.int64) * stride_an + (rr[:, None] * stride_ar + cols[None, :] * stride_an)
    dap_ptrs = dap_ptr + pid_m.to(tl.int64) * stride_dapi + col0.to(tl.int64) * stride_dapn + (
        rr[:, None] * stride_dapr + cols[None, :] * stride_dapn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = rr < R - r0
        g = tl.load(g_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(x.dtype)
        tl.store(dap_ptrs, tl.dot(tl.trans(g), x, input_precision=PRECISION), mask=r_ok[:, None] & n_ok[None, :])
        if COMPUTE_DX:
            a = tl.load(a_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(g, a, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_R * stride_gr
        a_ptrs += BLOCK_R * stride_ar
        dap_ptrs += BLOCK_R * stride_dapr
    if COMPUTE_DX:
        if HAS_DROPOUT:
            acc = tl.where(keep, acc * (scaling * dropout_scale), tl.zeros_like(acc))
        else:
            acc = acc * scaling
        acc = _gemm_tile(acc, dy_ptr, w_ptr, absmax_ptr, code_ptr, row0, col0, M, N, K,
                         stride_dym, stride_dyk, stride_wk, stride_wn,
                         NF4, NF4_ALIGNED, False, QBLOCK, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        dx_ptrs = dx_ptr + row0.to(tl.int64) * stride_dxm + col0.to(tl.int64) * stride_dxn + (
            rows[:, None] * stride_dxm + cols[None, :] * stride_dxn)
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mn_ok)
