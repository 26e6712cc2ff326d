"""
Rotary position embedding (NeoX rotate_half form) for packed q and k with per-token cos/sin.

out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), i.e. for the two halves of head_dim
    out1 = x1 * cos1 - x2 * sin1,    out2 = x2 * cos2 + x1 * sin2.
The map is linear in x, and its transpose is the same formula with (sin1, sin2) replaced by (-sin2, -sin1),
so one kernel does both directions. Each program rotates a block of tokens for every head, loading that
block's cos/sin once; arithmetic in fp32, result cast back to x's dtype.

Why a pass of its own rather than rotating inside attention's Q/K loads: the attention forward loads each
key block once per query block that sees it (seqlen / BLOCK_M times in a global layer), and so do both
backward passes, so rotating there repeats the rotation that often, on the same CUDA cores as the softmax.
This pass reads and writes q and k once each way. `bench.py attention` prints its time as a share of the
attention's, the most that fusing could save.
"""
import os

import torch
import triton
import triton.language as tl

BLOCK_T = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 32  # tokens per program
NUM_WARPS, NUM_STAGES = 4, 3  # launch settings, explicit so that modernbert_kernels.compile checks what runs


@triton.jit
def _rotary_kernel(X, Y, COS, SIN, n_tokens, n_heads, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct,
                   stride_st, HALF: tl.constexpr, BLOCK_T: tl.constexpr, TRANSPOSE: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) tokens
    offs_d = tl.arange(0, HALF)
    rows = offs_t[:, None] < n_tokens
    tok = offs_t[:, None].to(tl.int64)
    cos1 = tl.load(COS + tok * stride_ct + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)  # (BLOCK_T, HALF)
    cos2 = tl.load(COS + tok * stride_ct + HALF + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + tok * stride_st + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + tok * stride_st + HALF + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
    if TRANSPOSE:
        sin1, sin2 = -sin2, -sin1
    x_ptrs = X + tok * stride_xt + offs_d[None, :]
    y_ptrs = Y + tok * stride_yt + offs_d[None, :]
    for _ in range(n_heads):  # the pointers step one head at a time: no h * stride product to overflow int32
        x1 = tl.load(x_ptrs, mask=rows, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=rows, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (x1 * cos1 - x2 * sin1).to(Y.dtype.element_ty), mask=rows)
        tl.store(y_ptrs + HALF, (x2 * cos2 + x1 * sin2).to(Y.dtype.element_ty), mask=rows)
        x_ptrs += stride_xh
        y_ptrs += stride_yh


def _rotate(x, cos, sin, transpose=False):
    """x (total_tokens, n_heads, head_dim) -> rotated copy, contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total, n_heads, head_dim = x.shape
    if total > 0:
        _rotary_kernel[(triton.cdiv(total, BLOCK_T),)](x, y, cos, sin, total, n_heads, x.stride(0), x.stride(1),
                                                      y.stride(0), y.stride(1), cos.stride(0), sin.stride(0),
                                                      HALF=head_dim // 2, BLOCK_T=BLOCK_T, TRANSPOSE=transpose,
                                                      num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


class _Rotary(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _rotate(dq, cos, sin, transpose=True)
        dk = None if dk is None else _rotate(dk, cos, sin, transpose=True)
        return dq, dk, None, None


def apply_rotary(q, k, cos, sin):
    """q, k (total_tokens, n_heads, head_dim); cos, sin (total_tokens, head_dim) gathered per token (positions
    restart per sequence). Returns (q_rot, k_rot) in q's and k's dtypes; differentiable in q and k only."""
    head_dim = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[::2] != q.shape[::2] or cos.shape != (q.shape[0], head_dim) \
            or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: expected q, k (total, heads, head_dim) and cos, sin (total, head_dim), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"apply_rotary: head_dim must be a power of two from 16 to 256, got {head_dim}")
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    return _Rotary.apply(q, k, cos, sin)


def apply_rotary_reference(q, k, cos, sin):
    """Plain PyTorch equivalent of apply_rotary (in fp64 for fp64 inputs)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    cos, sin = cos[:, None, :].to(compute), sin[:, None, :].to(compute)  # (total_tokens, 1, head_dim)

    def rotate(x):
        xf = x.to(compute)  # one cast, so the backward also sums both terms in fp32
        x1, x2 = xf.chunk(2, -1)
        return (xf * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)

    return rotate(q), rotate(k)
