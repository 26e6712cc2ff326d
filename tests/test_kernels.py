"""
Triton kernels vs their plain PyTorch references.

Without CUDA the kernels run in Triton's interpreter (numpy on the CPU, one program at a time), so shapes
are tiny and the interpreter config uses blocks of 16 with 32-token work slots; lengths are chosen to cross
block and slot edges. With CUDA the same tests run compiled, plus bf16 checks at training sizes.
"""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, so set before importing them
import modernbert_kernels  # noqa: E402
import triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed(lengths, n_heads, head_dim, dtype, seed=0):
    """Random q, k, v (total, n_heads, head_dim), upstream grad do, and cu_seqlens for these lengths."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(sum(lengths), n_heads, head_dim, generator=g).to(DEVICE, dtype) for _ in range(4))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    return q, k, v, do, cu


def forward_backward(fn, q, k, v, do, *args, **kwargs):
    """fn's output and (dq, dk, dv) for upstream gradient do."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, *args, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def reference(q, k, v, do, cu, window=None, softmax_scale=None, dtype=torch.float32):
    """attention_reference one sequence at a time (so that 8k-token sequences fit in memory), on the inputs
    converted to `dtype`, or as they are with dtype=None (fp32 arithmetic, results rounded to their dtype)."""
    bounds = cu.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        one = torch.tensor([0, end - start], dtype=torch.int32, device=q.device)
        parts.append(forward_backward(modernbert_kernels.attention_reference,
                                      *(x[start:end].to(dtype or x.dtype) for x in (q, k, v, do)),
                                      one, end - start, window=window, softmax_scale=softmax_scale))
    return [torch.cat(xs) for xs in zip(*parts)]


# Every comparison of a kernel with its reference is made against fp64 on the same inputs (half-precision
# inputs as rounded): the kernel's error in each tensor may be at most ERROR_FACTOR times the reference's own
# error there, the reference computing in fp32 and rounding its results to the inputs' dtype. So the bound
# follows the arithmetic of these inputs (lengths, window, scale, dtype, this machine's BLAS) instead of a
# constant. The kernels' extra error is by design. In half precision they cast P and dS for the matrix
# units: measured worst ratios over the suite fp16 2.8, bf16 2.4. In fp32 their backward recomputes
# P = exp2(S - LSE) from scores and an fp32 LSE rounded apart from the forward's, an error that grows with
# |S| where the reference's (one softmax, P kept) does not: dv's ratio grows with the softmax scale, to 4.1
# at the suite's sharpest (softmax_scale 0.6, head_dim 32), 5.7 with the reference's P^T dO summed in other
# orders, as another BLAS may. Each factor leaves about 3x for another machine.
ERROR_FACTOR = {torch.float32: 16, torch.float16: 8, torch.bfloat16: 8}
EPS32 = torch.finfo(torch.float32).eps


def single_key_floors(q, k, v, do, softmax_scale):
    """Error allowances for dq, dk, dv of queries that see one key only (window 0, one-token sequences; q, k,
    v, do are those tokens' rows). There softmax is 1 and its gradient 0, which the reference computes
    exactly, and so is the kernels' out (P = exp2(0)). Their backward, though, forms dS = P (dP - delta) from
    two dot products of dO and V summed in different orders (dP by a matrix product, delta = rowsum(dO * O)
    with O = V), equal only in exact arithmetic: each keeps the rounding of a length-head_dim fp32 dot
    product, about sqrt(head_dim) eps sum|dO V|, which reaches dq = scale (dP - delta) K and
    dk = scale (dP - delta) Q (measured: within a tenth of that). And it recomputes P = exp2(S - LSE), exactly
    1 where S is summed as in the forward (the interpreter: dv measured exact), else off by a rounding of
    S, eps scale sum|Q K|, which reaches dv = P dO."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v, do = (x.double() for x in (q, k, v, do))
    ds = 2 * q.shape[-1] ** 0.5 * EPS32 * (do * v).abs().sum(-1)  # (tokens, n_heads): dP - delta
    p = EPS32 * scale * (q * k).abs().sum(-1)  # relative error of P
    return {"dq": scale * (ds * k.abs().amax(-1)).max().item(), "dk": scale * (ds * q.abs().amax(-1)).max().item(),
            "dv": (p * do.abs().amax(-1)).max().item()}


def assert_within_reference_error(got, want, exact, names, floors=None):
    """Each tensor of `got` at most ERROR_FACTOR[its dtype] times as far from `exact` (fp64) as `want` (the
    reference on the same inputs) is, or within its floor."""
    for name, a, b, c in zip(names, got, want, exact):
        assert a.dtype == b.dtype and a.shape == c.shape, name
        err, ref_err = ((x.double() - c).abs().max().item() if c.numel() else 0.0 for x in (a, b))
        bound = max(ERROR_FACTOR[a.dtype] * ref_err, (floors or {}).get(name, 0.0))
        assert err <= bound, (f"{name} ({a.dtype}): max error {err:.3g} against fp64, the reference's {ref_err:.3g}"
                              f" (bound {bound:.3g})")


def check_reference_error(got, q, k, v, do, cu, window=None, softmax_scale=None):
    """Kernel results `got` (out, dq, dk, dv, or a prefix) against the reference's own error on these inputs;
    the rows of queries that see one key only, where the reference is exact, against single_key_floors."""
    want = reference(q, k, v, do, cu, window, softmax_scale, dtype=None)
    exact = reference(q, k, v, do, cu, window, softmax_scale, dtype=torch.float64)
    lengths = cu.diff()
    single = torch.repeat_interleave((lengths == 1) | (window == 0), lengths)  # (total_tokens,)
    names = ("out", "dq", "dk", "dv")
    assert_within_reference_error(*([x[~single] for x in xs] for xs in (got, want, exact)), names)
    if single.any():
        floors = single_key_floors(*(x[single] for x in (q, k, v, do)), softmax_scale)
        assert_within_reference_error(*([x[single] for x in xs] for xs in (got, want, exact)), names, floors)


def check_attention(lengths, n_heads, head_dim, dtype, window, softmax_scale=None, seed=0, deterministic=True):
    q, k, v, do, cu = packed(lengths, n_heads, head_dim, dtype, seed)
    got = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, max(lengths), window=window,
                           softmax_scale=softmax_scale, deterministic=deterministic)
    check_reference_error(got, q, k, v, do, cu, window, softmax_scale)


# lengths: empty sequences at both ends, one token, a sequence spanning two 32-token work slots, and lengths
# that are not multiples of the block size (16)
LENGTHS = [0, 1, 17, 40, 5, 33, 0]


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("window", [None, 1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attn_matches_reference(dtype, window, head_dim):
    check_attention(LENGTHS, 2, head_dim, dtype, window)


@pytest.mark.parametrize("seed", range(4))
def test_flash_attn_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 40, (5,), generator=g).tolist()
    lengths[int(torch.randint(0, 5, (1,), generator=g))] = int(torch.randint(0, 2, (1,), generator=g))  # 0 or 1
    window = [None, 0, 2, 5, 16, 40][int(torch.randint(0, 6, (1,), generator=g))]
    check_attention(lengths, 3, 32, torch.float32, window, softmax_scale=0.3 + seed * 0.1, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 3])
def test_flash_attn_atomic_dq_backward(dtype, window):
    # the FlashAttention-2 style backward: one dK/dV pass that also adds each block pair's dq atomically
    check_attention(LENGTHS, 2, 32, dtype, window, softmax_scale=0.4, deterministic=False)


def test_flash_attn_head_dim_128():
    check_attention([20, 1, 35], 1, 128, torch.float16, window=3)


def test_flash_attn_window_zero_returns_v():
    q, k, v, do, cu = packed([3, 18, 1], 2, 32, torch.float32)
    torch.testing.assert_close(modernbert_kernels.flash_attn_varlen(q, k, v, cu, 18, window=0), v, atol=1e-6, rtol=0)


def test_flash_attn_strided_inputs_and_deterministic_backward():
    # q, k, v as views of one packed qkv projection, the way a model produces them; the grads are
    # computed without atomics, so they must repeat bit for bit
    lengths = [25, 0, 30]
    qkv = torch.randn(sum(lengths), 3, 2, 32, device=DEVICE)  # (total, 3, n_heads, head_dim)
    q, k, v = qkv.unbind(1)
    do = torch.randn(2, 32, sum(lengths), device=DEVICE).permute(2, 0, 1)  # non-contiguous upstream grad
    cu = torch.tensor([0, 25, 25, 55], dtype=torch.int32, device=DEVICE)
    first = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, 30)
    check_reference_error(first, q, k, v, do, cu)
    for a, b in zip(first, forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, 30)):
        assert torch.equal(a, b)


def test_flash_attn_all_sequences_empty():
    q, k, v, do, cu = packed([0, 0], 2, 32, torch.float32)
    out, dq, dk, dv = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, 0)
    assert out.shape == dq.shape == dk.shape == dv.shape == (0, 2, 32)


def test_work_table_and_autotune_bucket():
    # one row (seq_start, seq_end, slot_start) per SLOT tokens of each sequence, longest sequence first,
    # zero rows after; written out here with a plain loop
    fa = modernbert_kernels.flash_attn
    lengths = [3, 0, 2 * fa.SLOT + 1, fa.SLOT, 1, 0, fa.SLOT + 5]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    table = fa.work_table(cu, sum(lengths)).tolist()
    want = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep batch order
        start = sum(lengths[:i])
        want += [[start, start + lengths[i], slot] for slot in range(start, start + lengths[i], fa.SLOT)]
    assert table[:len(want)] == want
    assert all(row == [0, 0, 0] for row in table[len(want):])
    # global layers autotune per power-of-two bucket of max_seqlen, so a new max_seqlen rarely re-tunes;
    # a window layer's work per block does not grow with the length, so it tunes once
    q = torch.empty(1, 1, 32)
    bucket = lambda max_seqlen, window=None: fa._launch_args(q, window, max_seqlen)["SEQ_BUCKET"]
    assert bucket(600) == bucket(1024) == 1024 and bucket(1025) == 2048
    assert bucket(600, 64) == bucket(8192, 64)


def test_fp32_uses_tf32_only_where_torch_allows_it():
    # exact fp32 products on the CUDA cores at torch's default "highest"; TF32 tensor cores, as torch's own
    # matmuls, once the user allows them; half precision always goes to the tensor cores as it is
    args = lambda dtype: modernbert_kernels.flash_attn._launch_args(torch.empty(1, 1, 32, dtype=dtype), None, 64)["PRECISION"]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert args(torch.float32) == "ieee" and args(torch.bfloat16) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert args(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_flash_attn_rejects_bad_arguments():
    q, k, v, do, cu = packed([4], 1, 32, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        modernbert_kernels.flash_attn_varlen(q[..., :24], k[..., :24], v[..., :24], cu, 4)
    with pytest.raises(ValueError, match="window"):
        modernbert_kernels.flash_attn_varlen(q, k, v, cu, 4, window=-1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        modernbert_kernels.flash_attn_varlen(q, k, v, cu.long(), 4)


def small_model_batch(lengths, masked, seed, **config):
    """A small model (3 layers, local window 8) on DEVICE and a packed batch of these lengths, `masked` of its
    tokens labelled: (model, its keyword arguments, ids)."""
    import model
    config = model.ModernBertConfig.preset("tiny", vocab_size=97, hidden_size=64, num_attention_heads=2,
                                           intermediate_size=96, num_hidden_layers=3, local_attention=8, **config)
    torch.manual_seed(0)
    net = model.ModernBERT(config).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 97, (sum(lengths),), generator=g).to(DEVICE)
    labels = torch.where(torch.rand(ids.shape, generator=g).to(DEVICE) < masked, ids, model.IGNORE_INDEX)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    return net, dict(labels=labels, cu_seqlens=cu, max_seqlen=max(lengths)), ids


def test_model_on_kernels_matches_reference(monkeypatch):
    # the model's way into the kernels (q, k, v as strided views of one projection, per-token RoPE tables,
    # window = local_attention // 2 on local layers) against the same model on the PyTorch reference, in
    # fp32: in half precision the two paths' rounding differs by as much as a wrong window would
    import model
    net, batch, ids = small_model_batch([5, 0, 40, 17, 1], masked=0.5, seed=0)
    runs = {}
    for mode in ("reference", "kernels"):
        monkeypatch.setattr(model, "ATTENTION", mode)
        net.zero_grad()
        logits, loss = net(ids, **batch)
        loss.backward()
        runs[mode] = [logits, *(p.grad.clone() for p in net.parameters())]
    for i, (a, b) in enumerate(zip(runs["kernels"], runs["reference"])):
        err = ((a - b).abs().max() / b.abs().max()).item()  # relative to the tensor's largest magnitude
        assert err <= 1e-5, f"tensor {i} (0 = logits, then parameter grads): relative error {err:.3g}"


BATCH = [5, 40, 17, 1, 29]


def test_model_on_kernels_with_attention_dropout_takes_the_reference(monkeypatch):
    """The kernels have no dropout: in train mode with attention dropout the model takes the PyTorch path (the
    same masks as the reference run, drawn from the same seed); in eval mode, the kernels."""
    import model
    calls = []
    kernel = modernbert_kernels.flash_attn_varlen
    monkeypatch.setattr(modernbert_kernels, "flash_attn_varlen", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    net, batch, ids = small_model_batch(BATCH, masked=0.3, seed=1, attention_dropout=0.5)
    runs = {}
    for training in (True, False):
        net.train(training)
        for mode in ("reference", "kernels"):
            monkeypatch.setattr(model, "ATTENTION", mode)
            calls.clear()
            torch.manual_seed(3)
            logits, _ = net(ids, **batch)
            runs[training, mode] = (logits, len(calls))
    assert runs[True, "kernels"][1] == 0 and runs[False, "kernels"][1] == 3  # one call per layer in eval
    for training in (True, False):
        a, b = runs[training, "kernels"][0], runs[training, "reference"][0]
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-5, f"train={training}: relative error {err:.3g}"  # RoPE in the kernel vs in PyTorch
    assert (runs[True, "reference"][0] - runs[False, "reference"][0]).abs().max() > 1e-2  # dropout acted


def test_model_on_kernels_bf16_training_steps_track_fp32(monkeypatch, bf16_interpreter):
    """Five AdamW steps in bf16 (autocast, fp32 weights) on the kernels and on the PyTorch reference, each
    against the same steps in fp32 on the reference: the kernels' bf16 losses stay as close to fp32 as the
    reference's bf16 losses do (8x, the half-precision factor of the kernel comparisons above)."""
    import model
    losses = {}
    for mode, dtype in (("reference", torch.float32), ("reference", torch.bfloat16), ("kernels", torch.bfloat16)):
        monkeypatch.setattr(model, "ATTENTION", mode)
        net, batch, ids = small_model_batch(BATCH, masked=0.3, seed=1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        curve = []
        for _ in range(5):
            with torch.autocast(DEVICE, dtype, enabled=dtype != torch.float32):
                _, loss = net(ids, **batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        losses[mode, dtype] = torch.tensor(curve, dtype=torch.float64)
    fp32 = losses["reference", torch.float32]
    assert fp32[-1] < fp32[0] - 0.1  # it trains
    ours = (losses["kernels", torch.bfloat16] - fp32).abs().max().item()
    theirs = (losses["reference", torch.bfloat16] - fp32).abs().max().item()
    assert 0 < theirs and ours <= 8 * theirs, f"bf16 loss error: kernels {ours:.3g}, reference {theirs:.3g}"


def test_kernels_compile_for_hopper():
    # the interpreter above checks what the kernels compute, not that they compile for a GPU: build every
    # autotune config for sm_90 (H100) at the model's head_dim, in a process without the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "modernbert_kernels.compile", "--arch", "90", "--head_dim", "64", "--check"],
                         cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 problem(s)" in run.stdout


def rope_inputs(total, n_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, dq, dk = (torch.randn(total, n_heads, head_dim, generator=g).to(DEVICE, dtype) for _ in range(4))
    # arbitrary cos/sin rather than true rotations, so the transpose used in the backward is fully exercised
    cos, sin = (torch.randn(total, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, dq, dk, cos, sin


def rope_forward_backward(fn, q, k, dq, dk, cos, sin):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_rot, k_rot = fn(q, k, cos, sin)
    return (q_rot.detach(), k_rot.detach(), *torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_reference(dtype):
    q, k, dq, dk, cos, sin = rope_inputs(37, 3, 64, dtype)
    q = torch.cat([q, q], 1)[:, ::2]  # a strided view, as from a packed qkv tensor
    check_rotary(q, k, dq, dk, cos, sin)


def check_rotary(q, k, dq, dk, cos, sin):
    """apply_rotary's q_rot, k_rot, dq, dk against the reference's own error (fp64 as the yardstick); in the
    interpreter equal to the reference, which rounds the same fp32 multiplies and adds in the same order (a
    GPU may fuse them)."""
    got = rope_forward_backward(modernbert_kernels.apply_rotary, q, k, dq, dk, cos, sin)
    want = rope_forward_backward(modernbert_kernels.apply_rotary_reference, q, k, dq, dk, cos, sin)
    exact = rope_forward_backward(modernbert_kernels.apply_rotary_reference, *(x.double() for x in (q, k, dq, dk, cos, sin)))
    for a, b in zip(got, want):
        assert a.dtype == q.dtype and (DEVICE == "cuda" or torch.equal(a, b))
    assert_within_reference_error(got, want, exact, ("q_rot", "k_rot", "dq", "dk"))


def test_rotary_reference_is_rotate_half():
    # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), written out for one vector
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    cos, sin = torch.tensor([[0.5, 0.25, 0.5, 0.25]]), torch.tensor([[1.0, 2.0, 1.0, 2.0]])
    want = torch.tensor([[[1 * 0.5 - 3 * 1.0, 2 * 0.25 - 4 * 2.0, 3 * 0.5 + 1 * 1.0, 4 * 0.25 + 2 * 2.0]]])
    q_rot, _ = modernbert_kernels.apply_rotary_reference(x, x, cos, sin)
    torch.testing.assert_close(q_rot, want)


def low_precision_baseline(q, k, v, do, cu, window):
    """Per-sequence torch SDPA in the inputs' dtype: how far a standard half-precision kernel lands from the
    fp32 reference, the yardstick for ours."""
    parts = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask = None
        if window is not None:
            pos = torch.arange(end - start, device=q.device)
            mask = (pos[:, None] - pos[None, :]).abs() <= window  # (L, L) bool

        def sdpa(qs, ks, vs):  # (L, n_heads, head_dim) -> same
            out = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                                 attn_mask=mask)
            return out.transpose(0, 1)

        parts.append(forward_backward(sdpa, *(x[start:end] for x in (q, k, v, do))))
    return [torch.cat(xs) for xs in zip(*parts)]


def check_against_sdpa(got, want, base, what):
    """Each of out, dq, dk, dv within twice half-precision SDPA's distance from the fp32 reference."""
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, base):
        err, base_err = (a.float() - b).abs().max().item(), (c.float() - b).abs().max().item()
        assert err <= 2 * base_err + 1e-3, f"{name} {what}: max error {err:.3g} vs SDPA's {base_err:.3g}"


@cuda_only
@pytest.mark.parametrize("deterministic", [True, False], ids=["two_pass", "atomic_dq"])
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("lengths", [[1024] * 64, [8192] * 8, [3000, 0, 1, 777, 8192, 129, 4500]],
                         ids=["64x1k", "8x8k", "mixed"])
def test_flash_attn_gpu_bf16(lengths, window, deterministic):
    q, k, v, do, cu = packed(lengths, 12, 64, torch.bfloat16)
    got = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, max(lengths), window=window,
                           deterministic=deterministic)
    want = reference(q, k, v, do, cu, window)
    base = low_precision_baseline(q, k, v, do, cu, window)
    check_against_sdpa(got, want, base, f"window {window}")


@cuda_only
@pytest.mark.parametrize("head_dim, dtype", [(32, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16)])
def test_flash_attn_gpu_head_dims(dtype, head_dim):
    # each pair compiles 17 configs per window (~1 s each); bf16 at head_dim 64 is test_flash_attn_gpu_bf16
    lengths = [1, 0, 300, 2049, 64, 1000]
    for window in (None, 64):
        q, k, v, do, cu = packed(lengths, 4, head_dim, dtype)
        got = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, max(lengths), window=window)
        want = reference(q, k, v, do, cu, window)
        base = low_precision_baseline(q, k, v, do, cu, window)
        check_against_sdpa(got, want, base, f"window {window}")


@cuda_only
def test_flash_attn_gpu_int64_offsets():
    # 2**31 elements before the last two sequences: their element offsets overflow int32, so the kernels
    # must form them in int64 (8 tensors of 4.3 GB live at once; short sequences keep the work small)
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs a GPU with 60 GiB of memory")
    n_heads, head_dim = 16, 64
    lengths = [128] * 16384 + [777, 300]  # 16384 x 128 x 16 x 64 = 2**31
    total = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(total, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    for window in (None, 64):
        got = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, 777, window=window)
        for i in (0, len(lengths) - 2, len(lengths) - 1):  # the first sequence, and the two past 2**31
            start, end = cu[i].item(), cu[i + 1].item()
            one = torch.tensor([0, end - start], dtype=torch.int32, device="cuda")
            inputs = [x[start:end] for x in (q, k, v, do)]
            want = reference(*inputs, one, window)
            base = low_precision_baseline(*inputs, one, window)
            check_against_sdpa([x[start:end] for x in got], want, base, f"sequence {i} window {window}")
        del got


@cuda_only
def test_rotary_gpu_bf16():
    check_rotary(*rope_inputs(65536, 12, 64, torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------
# the yardstick itself, edge cases the GPU-sized tests cannot reach, and every autotune config


@pytest.mark.parametrize("window", [None, 0, 2, 7])
def test_attention_reference_matches_sdpa(window):
    # attention_reference (per sequence, masked_fill) against torch's SDPA on the zero-padded batch with an
    # explicit (batch, 1, L, L) mask of same-sequence keys inside the window, in fp64; forward and gradients
    lengths, scale = [5, 0, 12, 1, 9], 0.37
    q, k, v, do, cu = packed(lengths, 2, 16, torch.float32)
    got = forward_backward(modernbert_kernels.attention_reference, q, k, v, do, cu, max(lengths), window=window,
                           softmax_scale=scale)
    L, pos = max(lengths), torch.arange(max(lengths), device=DEVICE)
    real = pos[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]  # (batch, L) real tokens
    near = (pos[:, None] - pos[None, :]).abs() <= (L if window is None else window)  # (L, L)
    mask = real[:, None, None, :] & near  # (batch, 1, L, L): keys of the query's own sequence, in its window
    mask = mask | ~real[:, None, :, None]  # padded query rows see everything, so they stay finite (ignored)

    def padded_sdpa(q, k, v):  # packed (total, heads, dim) -> padded SDPA -> packed
        pad = lambda x: torch.stack([F.pad(x[a:b], (0, 0, 0, 0, 0, L - (b - a))) for a, b in
                                     zip(cu[:-1].tolist(), cu[1:].tolist())]).transpose(1, 2)  # (batch, heads, L, dim)
        out = F.scaled_dot_product_attention(*(pad(x).double() for x in (q, k, v)), attn_mask=mask, scale=scale)
        return out.transpose(1, 2)[real].float()  # (total, heads, dim)

    want = forward_backward(padded_sdpa, q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("window", [38, 39, 1000, 2**31 - 40, 2**31 - 1])
def test_flash_attn_window_covering_every_sequence_is_global(monkeypatch, window):
    # no two tokens of a 40-token sequence are more than 39 apart, so windows from 39 up are global attention;
    # near 2**31 the window band's bounds overflowed int32 (zero output, NaN dk/dv), so the global path must
    # be taken, and it is (the kernels are launched with WINDOW=-1); 38 still masks the two ends
    fa = modernbert_kernels.flash_attn
    launched = []
    launch_args = fa._launch_args
    monkeypatch.setattr(fa, "_launch_args", lambda *a: launched.append(launch_args(*a)["WINDOW"]) or
                        launch_args(*a))
    q, k, v, do, cu = packed([40, 7, 33], 2, 16, torch.float32)
    got = forward_backward(modernbert_kernels.flash_attn_varlen, q, k, v, do, cu, 40, window=window)
    effective = window if window < 39 else None
    check_reference_error(got, q, k, v, do, cu, effective)
    assert launched and set(launched) == {-1 if effective is None else window}


def test_flash_attn_sees_cu_seqlens_edited_in_place():
    # edits that leave the tensor's version counter alone (through .data, or a numpy alias on the CPU) must
    # not reuse a work table built for the old boundaries
    q, k, v, do, cu = packed([20, 20], 2, 16, torch.float32)
    modernbert_kernels.flash_attn_varlen(q, k, v, cu, 20)
    version = cu._version
    cu.data[1] = 7
    check_reference_error([modernbert_kernels.flash_attn_varlen(q, k, v, cu, 33)], q, k, v, do, cu)
    if DEVICE == "cpu":
        cu.numpy()[1] = 29
        check_reference_error([modernbert_kernels.flash_attn_varlen(q, k, v, cu, 29)], q, k, v, do, cu)
    assert cu._version == version  # the edits were invisible to the version counter


@pytest.mark.skipif(DEVICE == "cuda", reason="pins configs in the interpreter; on a GPU the autotuner tries them all")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_autotune_config_matches_reference(monkeypatch, dtype):
    # only the autotuner's pick runs on a GPU, so a config that computes the wrong thing could hide: pin round
    # i's block shape of each kernel (half-precision and exact-fp32 lists) and check it. The interpreter
    # ignores warps and stages (modernbert_kernels.compile builds those); GPU work slots (128 tokens) so that every block
    # size fits, and a 130-token sequence crosses them
    fa = modernbert_kernels.flash_attn
    monkeypatch.setattr(fa, "SLOT", 128)
    kinds = [(fa._fwd_kernel, fa.FWD_CONFIGS + fa.FWD_CONFIGS_IEEE),
             (fa._bwd_dq_kernel, fa.DQ_CONFIGS + fa.DQ_CONFIGS_IEEE),
             (fa._bwd_dkdv_kernel, fa.DKDV_CONFIGS + fa.DKDV_CONFIGS_IEEE)]
    kinds = [(kernel, list(dict.fromkeys((m, n) for m, n, _, _ in shapes))) for kernel, shapes in kinds]
    for i in range(max(len(blocks) for _, blocks in kinds)):
        for kernel, blocks in kinds:
            m, n = blocks[i % len(blocks)]
            monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n})])
        for window in (None, 5):
            check_attention([130, 3, 0, 64], 2, 16, dtype, window, seed=i)


def test_block_larger_than_work_slot_is_refused(monkeypatch):
    # programs find their work-table row as program_id // (SLOT // BLOCK): a block that does not divide the
    # slot would silently skip or repeat tokens, so the launch asserts it
    fa = modernbert_kernels.flash_attn
    monkeypatch.setattr(fa._fwd_kernel, "configs", [triton.Config({"BLOCK_M": 2 * fa.SLOT, "BLOCK_N": 16})])
    q, k, v, do, cu = packed([20], 1, 16, torch.float32)
    with pytest.raises(AssertionError, match="work slots"):
        modernbert_kernels.flash_attn_varlen(q, k, v, cu, 20)


@pytest.fixture
def bf16_interpreter(monkeypatch):
    """Triton's interpreter multiplies bf16 bit patterns as if they were integers in tl.dot and truncates
    fp32 -> bf16 casts; a GPU does neither. Patch both to what the hardware does (operands widened exactly,
    casts rounded to nearest even) so bf16 loads, casts and stores are exercised. Test-only; no-op on CUDA."""
    if DEVICE == "cuda":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def widen(h):  # bf16 handle (uint16 bit patterns) -> fp32 handle, exact
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def narrow(data):  # fp32 array -> bf16 bit patterns, round to nearest even (no NaN or inf occurs here)
        bits = data.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)

    builder = interpreter.InterpreterBuilder
    cast, dot = builder.cast_impl, builder.create_dot

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:
            return widen(src)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(narrow(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, *args):
        a, b = (widen(x) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return dot(self, a, b, *args)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    monkeypatch.setattr(builder, "create_dot", create_dot)


@pytest.mark.parametrize("window", [None, 3])
def test_flash_attn_bf16(bf16_interpreter, window):
    check_attention(LENGTHS, 2, 32, torch.bfloat16, window)


def test_rotary_bf16(bf16_interpreter):
    check_rotary(*rope_inputs(37, 3, 64, torch.bfloat16))  # both compute in fp32 and round once to bf16
