"""
Flash attention for packed variable-length batches: bidirectional, optionally a sliding window.

q, k, v are (total_tokens, n_heads, head_dim), sequences packed back to back, cu_seqlens (batch+1,) int32
marks where each starts. Query i sees key j iff both are in the same sequence and, with a window w,
|i - j| <= w.

Forward, one program per (query block, head): stream the visible key blocks, keep the running row max m
and row sum l of exp(s - m) in fp32 (online softmax; base 2 with log2(e) folded into the scale), rescale
the fp32 accumulator when m grows, then store O and the log-sum-exp LSE = m + log2(l) per row.
Backward, deterministic (no atomics, the default): a dQ pass, one program per query block, which also
stores delta = rowsum(dO * O); then a dK/dV pass, one program per key block. Both recompute P = exp2(s - LSE).
With deterministic=False, FlashAttention-2's backward instead: a small pass for delta, then the dK/dV pass
also adds dS K to an fp32 dq buffer with atomic adds.

Work list: a small int32 table with one row (seq_start, seq_end, slot_start) per SLOT tokens of each
sequence, longest sequence first. A kernel with block size B runs SLOT // B programs per row, so short
sequences get only their own blocks, the long global-attention programs start first (less tail), the table
is built on the device without reading cu_seqlens back, and it suits whatever block size autotuning picks.
Only blocks that intersect the sequence and the window band are visited (loop bounds), so a local layer
costs tokens x window. Element masks are applied on the last partial block (global) or the band blocks
(window) only. A window that covers every sequence (w >= max_seqlen - 1) runs as global attention.

What each choice should cost, on paper until a GPU measures it (`python bench.py gpu` times both backwards):
- Two-pass backward: 7 matrix products per (query block, key block) pair (S and dP are recomputed in both
  passes) where FlashAttention-2 does 5: 40% more backward tensor-core work, fwd+bwd 9 : 7 = +29% when
  compute-bound, in exchange for bit-identical gradients run to run and no fp32 dq buffer.
- Atomic dq (deterministic=False): saves those 2 products, but adds per pair BLOCK_M x head_dim fp32 atomic
  adds to L2 (head_dim x L^2 / BLOCK_N per head and global layer: for L = 8192, head_dim 64, BLOCK_N 128,
  134 MB of atomic traffic per head against ~4e10 FLOPs of products, the same order of time on an H100),
  plus zeroing, scaling and casting an fp32 dq (12 bytes per element). Which wins is for the GPU to say.
- Work table: ~10 small device ops per forward (model.py builds it once per forward for all layers), tens
  of microseconds; longest-first order shortens the tail of a batch whose longest sequence has most work.
- Autotuning: 6 + 5 + 6 configs (and 6 more for the atomic backward), compiled once per head_dim, dtype and
  window (~1 s each for sm_90 on one CPU core, `python -m modernbert_kernels.compile`), timed once per key: global
  layers per power-of-two bucket of max_seqlen, window layers once (their work per block does not grow with
  the length).
- fp32 inputs: with torch.get_float32_matmul_precision() "high" or "medium" the products run on TF32 tensor
  cores (about half bf16's rate on an H100); at the default "highest" they run exactly on the CUDA cores
  (67 TFLOP/s fp32 FMA against ~990 dense bf16 on an H100 SXM, and small blocks to avoid spilling): expect
  an fp32 evaluation's attention to be 15x or more slower than bf16's. Train and evaluate in bf16.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SLOT = 32 if INTERPRET else 128  # tokens per work-table row; every block size divides it
LOG2E = 1.4426950408889634


# autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel on a GPU
FWD_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 4)]
DQ_CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
DKDV_CONFIGS = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)]


# exact fp32 (PRECISION "ieee") multiplies on the CUDA cores with both operand tiles in registers: every
# config above spills there (0.2-12 KB per thread on sm_90 at head_dim 64), so exact fp32 tunes over small
# blocks that do not (`python -m modernbert_kernels.compile --dtype fp32` shows which)
FWD_CONFIGS_IEEE = [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 1)]
DQ_CONFIGS_IEEE = [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]
DKDV_CONFIGS_IEEE = [(16, 64, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2)]
_SHAPES = {"_fwd_kernel": (FWD_CONFIGS, FWD_CONFIGS_IEEE), "_bwd_dq_kernel": (DQ_CONFIGS, DQ_CONFIGS_IEEE),
           "_bwd_dkdv_kernel": (DKDV_CONFIGS, DKDV_CONFIGS_IEEE)}
# SEQ_BUCKET: next power of two of max_seqlen (0 for window layers); the autotuner adds the tensors' dtypes
AUTOTUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "WINDOW", "PRECISION"]


def _configs(shapes):
    """triton.Configs of (BLOCK_M, BLOCK_N, num_warps, num_stages); one small config in the interpreter."""
    if INTERPRET:
        shapes = [(16, 16, 1, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def autotune_configs(kernel, precision):
    """The configs a launch of `kernel` (an autotuned kernel of this module) tunes over at `precision`."""
    fast, exact = _SHAPES[kernel.fn.__name__]
    return _configs(exact if precision == "ieee" else fast)


def _autotune(name, extra_key=(), **kwargs):
    """triton.autotune over both config lists of kernel `name`, pruned at launch to the list for PRECISION."""
    fast, exact = (_configs(shapes) for shapes in _SHAPES[name])
    prune = lambda configs, named_args, **launch: exact if launch["PRECISION"] == "ieee" else fast
    return triton.autotune(configs=fast if INTERPRET else fast + exact, key=AUTOTUNE_KEY + list(extra_key),
                           prune_configs_by={"early_config_prune": prune}, **kwargs)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seq_end, qk_scale,
               WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) (token indices) into the running (acc, l_i, m_i) of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key tokens
        k_ptrs = Kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
        v_ptrs = Vh + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_end, other=0.0)  # (BLOCK_N, HEAD_DIM)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = offs_n[None, :] < seq_end
            if WINDOW >= 0:
                visible = visible & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= WINDOW)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_end, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("_fwd_kernel")
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, TABLE, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, total, qk_scale, SEQ_BUCKET, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
                SLOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) // (SLOT // BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    seq_start = tl.load(TABLE + 3 * row)
    seq_end = tl.load(TABLE + 3 * row + 1)
    q_start = tl.load(TABLE + 3 * row + 2) + tl.program_id(0) % (SLOT // BLOCK_M) * BLOCK_M
    if q_start >= seq_end:  # the slot's tail past its sequence, or an unused table row
        return
    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query tokens
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = offs_m[:, None] < seq_end
    q = tl.load(Q + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=q_rows,
                other=0.0)  # (BLOCK_M, HEAD_DIM)
    # m starts finite so that rows past seq_end, which may see no key, stay free of inf - inf
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    Kh = K + h * stride_kh
    Vh = V + h * stride_vh
    if WINDOW >= 0:
        lo = tl.maximum(seq_start, q_start - WINDOW)
        hi = tl.minimum(seq_end, q_start + BLOCK_M + WINDOW)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, lo, hi,
                                   seq_end, qk_scale, WINDOW, True, BLOCK_N, PRECISION)
    else:
        full_end = seq_start + (seq_end - seq_start) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, seq_start,
                                   full_end, seq_end, qk_scale, WINDOW, False, BLOCK_N, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, full_end,
                                   seq_end, seq_end, qk_scale, WINDOW, True, BLOCK_N, PRECISION)
    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(O + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=q_rows)
    tl.store(LSE + h * total + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq_end)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seq_end, qk_scale,
              WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Add dS K over key blocks [lo, hi) to one query block's dq (scaled by the caller)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key tokens
        k_ptrs = Kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
        v_ptrs = Vh + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_end, other=0.0)  # (BLOCK_N, HEAD_DIM)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_end, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < seq_end
            if WINDOW >= 0:
                visible = visible & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= WINDOW)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@_autotune("_bwd_dq_kernel")
@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, TABLE, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                   stride_vh, stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh, total,
                   qk_scale, sm_scale, SEQ_BUCKET, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
                   SLOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) // (SLOT // BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    seq_start = tl.load(TABLE + 3 * row)
    seq_end = tl.load(TABLE + 3 * row + 1)
    q_start = tl.load(TABLE + 3 * row + 2) + tl.program_id(0) % (SLOT // BLOCK_M) * BLOCK_M
    if q_start >= seq_end:
        return
    offs_m = q_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query tokens
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < seq_end
    tok = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + h * stride_qh + tok * stride_qt + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + h * stride_doh + tok * stride_dot + offs_d[None, :], mask=rows[:, None], other=0.0)
    o = tl.load(O + h * stride_oh + tok * stride_ot + offs_d[None, :], mask=rows[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,) rowsum(dO * O), for the dK/dV pass too
    tl.store(DELTA + h * total + offs_m, delta, mask=rows)
    lse = tl.load(LSE + h * total + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    Kh = K + h * stride_kh
    Vh = V + h * stride_vh
    if WINDOW >= 0:
        lo = tl.maximum(seq_start, q_start - WINDOW)
        hi = tl.minimum(seq_end, q_start + BLOCK_M + WINDOW)
        dq = _dq_inner(dq, q, do, lse, delta, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seq_end,
                       qk_scale, WINDOW, True, BLOCK_N, PRECISION)
    else:
        full_end = seq_start + (seq_end - seq_start) // BLOCK_N * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, seq_start, full_end,
                       seq_end, qk_scale, WINDOW, False, BLOCK_N, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, Kh, Vh, stride_kt, stride_vt, offs_m, offs_d, full_end, seq_end,
                       seq_end, qk_scale, WINDOW, True, BLOCK_N, PRECISION)
    tl.store(DQ + h * stride_dqh + tok * stride_dqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=rows[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt, offs_n, offs_d, lo,
                hi, seq_end, qk_scale, WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Add the contributions of query blocks [lo, hi) to one key block's dk (unscaled) and dv; with ATOMIC_DQ,
    also add this key block's share of each query block's dq (unscaled) to the fp32 buffer DQ atomically."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query tokens
        q_ptrs = Qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
        do_ptrs = DOh + offs_m[:, None].to(tl.int64) * stride_dot + offs_d[None, :]
        if MASKED:
            rows = offs_m < seq_end
            q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
            do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
            lse = tl.load(LSEh + offs_m, mask=rows, other=0.0)
            delta = tl.load(DELTAh + offs_m, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSEh + offs_m)
            delta = tl.load(DELTAh + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            visible = offs_m[None, :] < seq_end
            if WINDOW >= 0:
                visible = visible & (tl.abs(offs_n[:, None] - offs_m[None, :]) <= WINDOW)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION)  # (BLOCK_M, HEAD_DIM)
            dq_ptrs = DQh + offs_m[:, None].to(tl.int64) * stride_dqt + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < seq_end, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@_autotune("_bwd_dkdv_kernel", ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"])  # each timing run adds to zeros
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ_ACC, LSE, DELTA, TABLE, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_dqt, stride_dqh, total, qk_scale, sm_scale, SEQ_BUCKET, HEAD_DIM: tl.constexpr,
                     WINDOW: tl.constexpr, SLOT: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) // (SLOT // BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    seq_start = tl.load(TABLE + 3 * row)
    seq_end = tl.load(TABLE + 3 * row + 1)
    k_start = tl.load(TABLE + 3 * row + 2) + tl.program_id(0) % (SLOT // BLOCK_N) * BLOCK_N
    if k_start >= seq_end:
        return
    offs_n = k_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key tokens
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_n[:, None] < seq_end
    tok = offs_n[:, None].to(tl.int64)
    k = tl.load(K + h * stride_kh + tok * stride_kt + offs_d[None, :], mask=rows, other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + h * stride_vh + tok * stride_vt + offs_d[None, :], mask=rows, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    Qh = Q + h * stride_qh
    DOh = DO + h * stride_doh
    LSEh = LSE + h * total
    DELTAh = DELTA + h * total
    DQh = DQ_ACC + h * stride_dqh
    if WINDOW >= 0:
        lo = tl.maximum(seq_start, k_start - WINDOW)
        hi = tl.minimum(seq_end, k_start + BLOCK_N + WINDOW)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt, offs_n,
                             offs_d, lo, hi, seq_end, qk_scale, WINDOW, True, BLOCK_M, PRECISION, ATOMIC_DQ)
    else:
        full_end = seq_start + (seq_end - seq_start) // BLOCK_M * BLOCK_M
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt, offs_n,
                             offs_d, seq_start, full_end, seq_end, qk_scale, WINDOW, False, BLOCK_M, PRECISION,
                             ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt, offs_n,
                             offs_d, full_end, seq_end, seq_end, qk_scale, WINDOW, True, BLOCK_M, PRECISION,
                             ATOMIC_DQ)
    tl.store(DK + h * stride_dkh + tok * stride_dkt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=rows)
    tl.store(DV + h * stride_dvh + tok * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=rows)


DELTA_BLOCK, DELTA_WARPS = (16 if INTERPRET else 64), 4  # tokens per program of the delta kernel, warps


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total, HEAD_DIM: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """delta = rowsum(dO * O) per (head, token), for the atomic-dq backward (the dQ pass does it otherwise)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) tokens
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_t < total
    tok = offs_t[:, None].to(tl.int64)
    o = tl.load(O + h * stride_oh + tok * stride_ot + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + h * stride_doh + tok * stride_dot + offs_d[None, :], mask=rows[:, None], other=0.0)
    tl.store(DELTA + h * total + offs_t, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=rows)


def work_table(cu_seqlens, total):
    """int32 (rows, 3): (seq_start, seq_end, slot_start) per SLOT tokens of each sequence, longest first;
    rows past the real ones are (0, 0, 0). Built on the device with no host sync, from cu_seqlens as it is
    now: a caller may build it once and pass it to every layer of one forward (model.py does), but nothing
    here caches it, since an in-place edit of cu_seqlens (through .data, a numpy alias, a CUDA graph replay)
    need not bump any version a cache could check."""
    torch._assert_async(cu_seqlens[-1] == total)  # fails on the device when cu_seqlens and q disagree
    cu = cu_seqlens.long()
    batch = cu.numel() - 1
    starts, lens = cu[:-1], cu[1:] - cu[:-1]  # (batch,)
    n_slots = (lens + SLOT - 1) // SLOT
    slots_end = torch.cumsum(n_slots, 0)
    idx = torch.arange(total // SLOT + batch, device=cu.device)  # >= sum(n_slots) whatever the lengths
    seq = torch.searchsorted(slots_end, idx, right=True)  # (rows,) sequence of each row; batch = unused
    used = seq < batch
    seq = seq.clamp(max=batch - 1)
    slot_start = starts[seq] + (idx - slots_end[seq] + n_slots[seq]) * SLOT
    table = torch.stack([starts[seq], starts[seq] + lens[seq], slot_start], 1) * used[:, None]
    table = table[torch.argsort(torch.where(used, lens[seq], -1), descending=True, stable=True)]
    return table.to(torch.int32).contiguous()


def _launch_args(q, window, max_seqlen):
    """Compile-time and key arguments shared by the three kernels. A window layer's work per program does
    not depend on the sequence length, so its autotuning key leaves the length bucket out (SEQ_BUCKET 0)."""
    if q.dtype == torch.float32:  # tensor cores in TF32 only where torch's matmuls may use them too
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "tf32"  # ignored: fp16/bf16 operands go to the tensor cores as they are
    return dict(SEQ_BUCKET=0 if window is not None else triton.next_power_of_2(max(max_seqlen, 16)),
                HEAD_DIM=q.shape[-1], WINDOW=-1 if window is None else window, SLOT=SLOT, PRECISION=precision)


def _grid(table, n_heads, block):
    """SLOT // block programs per work-table row (the kernels find their row that way), times heads."""
    assert SLOT % block == 0, f"work slots of {SLOT} tokens do not split into blocks of {block}"
    return table.shape[0] * (SLOT // block), n_heads


class _FlashAttnVarlen(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, table, max_seqlen, window, softmax_scale, deterministic):
        total, n_heads, head_dim = q.shape
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (total_tokens, n_heads, head_dim)
        lse = torch.empty((n_heads, total), dtype=torch.float32, device=q.device)  # log2 units
        grid = lambda meta: _grid(table, n_heads, meta["BLOCK_M"])
        _fwd_kernel[grid](q, k, v, o, lse, table, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                          v.stride(1), o.stride(0), o.stride(1), total, softmax_scale * LOG2E,
                          **_launch_args(q, window, max_seqlen))
        ctx.save_for_backward(q, k, v, o, lse, table)
        ctx.window, ctx.max_seqlen, ctx.softmax_scale = window, max_seqlen, softmax_scale
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, table = ctx.saved_tensors
        total, n_heads, head_dim = q.shape
        if do.stride(-1) != 1:
            do = do.contiguous()
        dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (k, v))
        delta = torch.empty_like(lse)  # (n_heads, total) rowsum(dO * O)
        scales = (ctx.softmax_scale * LOG2E, ctx.softmax_scale)
        consts = _launch_args(q, ctx.window, ctx.max_seqlen)
        if ctx.deterministic:  # a dQ pass (which also writes delta), then the dK/dV pass: 7 products per block pair
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            grid = lambda meta: _grid(table, n_heads, meta["BLOCK_M"])
            _bwd_dq_kernel[grid](q, k, v, o, do, dq, lse, delta, table, q.stride(0), q.stride(1), k.stride(0),
                                 k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), do.stride(0),
                                 do.stride(1), dq.stride(0), dq.stride(1), total, *scales, **consts)
            dq_acc = torch.zeros(0, dtype=torch.float32, device=q.device)  # unused
        else:  # delta, then one pass adding dq atomically in fp32: 5 products per block pair, as FlashAttention-2
            _bwd_delta_kernel[(triton.cdiv(total, DELTA_BLOCK), n_heads)](
                o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), total, HEAD_DIM=head_dim,
                BLOCK_T=DELTA_BLOCK, num_warps=DELTA_WARPS, num_stages=1)
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (total, n_heads, head_dim)
        grid = lambda meta: _grid(table, n_heads, meta["BLOCK_N"])
        _bwd_dkdv_kernel[grid](q, k, v, do, dk, dv, dq_acc, lse, delta, table, q.stride(0), q.stride(1), k.stride(0),
                               k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0),
                               dk.stride(1), dv.stride(0), dv.stride(1), n_heads * head_dim, head_dim, total,
                               *scales, ATOMIC_DQ=not ctx.deterministic, **consts)
        if not ctx.deterministic:
            dq = (dq_acc * ctx.softmax_scale).to(q.dtype)
        return dq, dk, dv, None, None, None, None, None


def flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, window=None, softmax_scale=None, table=None,
                      deterministic=True):
    """Attention over packed sequences. q, k, v (total_tokens, n_heads, head_dim) fp16/bf16/fp32 on one
    device; cu_seqlens int32 (batch+1,) with cu_seqlens[-1] == total_tokens; max_seqlen an int >= the longest
    sequence (sets the autotuning bucket); window None (global) or w >= 0 (query i sees key j iff
    |i - j| <= w); softmax_scale defaults to head_dim ** -0.5; table: work_table(cu_seqlens, total_tokens)
    if the caller already has it, else built here. fp32 inputs use TF32 tensor cores when
    torch.get_float32_matmul_precision() allows it, else exact fp32 on the CUDA cores (several times slower,
    see the module docstring). deterministic=False takes the FlashAttention-2 style backward: one pass, dq
    added atomically in fp32 (fewer products, but the order of the additions, so dq's last bits, vary from
    run to run). Returns (total_tokens, n_heads, head_dim) in q's dtype."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"flash_attn_varlen: q, k, v must share one (total_tokens, n_heads, head_dim) shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"flash_attn_varlen: head_dim must be 16, 32, 64 or 128, got {q.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attn_varlen: q, k, v must share a dtype among fp16/bf16/fp32, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"flash_attn_varlen: cu_seqlens must be int32 (batch+1,), got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"flash_attn_varlen: q, k, v, cu_seqlens must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}, {cu_seqlens.device}")
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"flash_attn_varlen: window must be None or an int >= 0, got {window!r}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    total = q.shape[0]
    if window is not None and window >= min(int(max_seqlen), total) - 1:
        # no two tokens of a sequence are farther apart than the window: global attention, which visits the
        # same keys without the band's masks, and keeps the band's bounds (start + block + window) in int32
        window = None
    if table is None:
        table = work_table(cu_seqlens, total)
    return _FlashAttnVarlen.apply(q, k, v, table, int(max_seqlen), window, scale, bool(deterministic))


def attention_reference(q, k, v, cu_seqlens, max_seqlen, window=None, softmax_scale=None):
    """Plain PyTorch equivalent of flash_attn_varlen: per sequence, explicit (n_heads, L, L) scores with the
    |i - j| <= window mask, softmax, all in fp32 (fp64 for fp64 inputs), the result in q's dtype. O(L^2)
    memory: for tests and short inputs only."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    compute = torch.promote_types(q.dtype, torch.float32)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1).to(compute) for x in (q, k, v))  # (n_heads, L, head_dim)
        scores = qs @ ks.transpose(1, 2) * scale  # (n_heads, L, L)
        if window is not None:
            pos = torch.arange(end - start, device=q.device)
            scores = scores.masked_fill((pos[:, None] - pos[None, :]).abs() > window, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype))  # (L, n_heads, head_dim)
    return torch.cat(outs)
