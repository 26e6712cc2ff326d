"""
Benchmarks, each measured side by side with its baseline in one run and printed as a ratio.

    python bench.py model       # our MLM step vs transformers' ModernBertForMaskedLM (CPU or GPU)
    python bench.py attention   # Triton varlen attention vs SDPA / varlen_attn (GPU); --flex: vs FlexAttention
    python bench.py data        # prepare and loader throughput
    python bench.py data --budget  # micro-batches by token budget vs by sequence count, stage 1 and 2
    python bench.py data --scale   # the loader on 1M-100M documents and 2,000 shards vs the design before it
    python bench.py data --scale --mixture 20   # a mixture of 20 corpora vs one of them alone
    python bench.py train       # tokens/s, MFU, peak memory of the stage-1/2 shapes (GPU)
    python bench.py gpu --out DIR   # all of the GPU checks below in one call, < 8 min
    python bench.py ppl         # pseudo-perplexity vs the same method computed with transformers
    python bench.py finetune    # a JSTS fine-tuning step vs transformers' ModernBertForSequenceClassification
    python bench.py grid        # evaluate.py's JGLUE grid on 1 process vs 2 under torchrun (one thread each)

Each task is a function `bench_<task>(args)` below; `--out FILE` appends the printed results as JSON.

`python bench.py gpu --out DIR` is the one call for a GPU machine, held to a 7.5-minute budget from a cold
Triton cache: the CUDA tests of tests/test_kernels.py and tests/test_model.py, then `attention` (ours vs
SDPA and varlen_attn, then the atomic-dq backward; 1k and 8k sequences, global and window 64), then
`train --quick` without and with torch.compile, then `attention --flex`, each part in its own processes
under a time limit so that a failed part does not stop the rest. Every figure is appended to DIR/gpu.jsonl
(device, date, commit, versions on each line) the moment it is measured, each part's output goes to
DIR/gpu_<part>.log as it comes, and a summary table comes last. Without CUDA it stops with one line.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from ranks import Problem

REPO = Path(__file__).resolve().parent


def compare(fns, warmup=1, iters=5, sync=None):
    """Median wall time in seconds of each function in the dict `fns`, measured in interleaved rounds so
    that a change in machine load affects every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if sync: sync()
            t0 = time.perf_counter()
            fn()
            if sync: sync()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def timeit(fn, warmup=1, iters=5, sync=None):
    """Median wall time of fn() in seconds, after warmup calls."""
    return compare({"fn": fn}, warmup, iters, sync)["fn"]


def environment():
    """What a result was measured on: device, date, commit, versions."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit, "device": device,
            "torch": torch.__version__, "python": platform.python_version()}


FIGURE = "@figure "  # starts an output line that carries one measured figure as JSON (bench.py gpu collects them)


def emit(args, figure):
    """With --stream, print one measured figure as a FIGURE line at once, for bench.py gpu to append to
    gpu.jsonl while the benchmark runs (a benchmark killed at its time limit keeps what it measured)."""
    if args.stream:
        print(FIGURE + json.dumps(figure), flush=True)

# ---------------------------------------------------------------------------------------------------------
# benchmarks (one function each)


def document_lengths(n, max_len, seed=0):
    """n lengths in [8, max_len] from a log-normal like real documents, scaled so the padded (n, max_len)
    batch is about half padding."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.9)
    lengths = (raw / raw.mean() * 0.5 * max_len).round().clamp(8, max_len).long()
    lengths[0] = max_len  # the batch is as long as its longest document
    return lengths


def bench_model(args):
    """Forward + backward of one MLM step (30% of tokens labelled) on the same weights and padded batch:
    ours (unpadded, sparse prediction) vs transformers' ModernBertForMaskedLM, default and sparse_prediction."""
    import tempfile
    import transformers
    from model import IGNORE_INDEX, ModernBERT, ModernBertConfig
    layers, batch, max_len = (2, 4, 128) if args.quick else (6, 8, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ModernBertConfig.preset("llm-jp-modernbert-base", num_hidden_layers=layers)
    torch.manual_seed(0)
    ours = ModernBERT(config).to(device)
    lengths = document_lengths(batch, max_len)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(8, config.vocab_size, (batch, max_len)).masked_fill(mask == 0, config.pad_token_id)
    labels = torch.where((torch.rand(batch, max_len) < 0.3) & mask.bool(), ids, IGNORE_INDEX)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = {sparse: transformers.AutoModelForMaskedLM.from_pretrained(d, sparse_prediction=sparse).to(device)
                  for sparse in (False, True)}
    sync = torch.cuda.synchronize if device == "cuda" else None

    def step(model, hf):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss if hf else model(ids, mask, labels=labels)[1]
        loss.backward()
        return loss.item()

    losses = {"ours": step(ours, False), **{f"hf_sparse={s}": step(m, True) for s, m in theirs.items()}}
    assert max(losses.values()) - min(losses.values()) < 1e-3, f"the models disagree on the loss: {losses}"
    t = compare({"ours": lambda: step(ours, False), False: lambda: step(theirs[False], True),
                 True: lambda: step(theirs[True], True)}, iters=3 if args.quick else 5, sync=sync)
    t_ours, t_hf = t.pop("ours"), t
    real = int(lengths.sum())
    print(f"llm-jp-modernbert-base shape with {layers} of its 22 layers; batch {batch} x {max_len}, "
          f"{real} real tokens ({1 - real / (batch * max_len):.0%} padding), fwd+bwd, fp32, {device}")
    print(f"{'model':<44}{'ms/step':>10}{'real tok/s':>12}{'ours faster':>13}")
    rows = [("ours (unpadded, sparse prediction)", t_ours), ("transformers ModernBertForMaskedLM", t_hf[False]),
            ("transformers, sparse_prediction=True", t_hf[True])]
    for name, t in rows:
        print(f"{name:<44}{t * 1e3:>10.1f}{real / t:>12.0f}{t / t_ours:>12.2f}x")
    return {"layers": layers, "batch": batch, "max_len": max_len, "real_tokens": real, "ms_ours": t_ours * 1e3,
            "ms_hf": t_hf[False] * 1e3, "ms_hf_sparse": t_hf[True] * 1e3,
            "speedup": t_hf[False] / t_ours, "speedup_vs_sparse": t_hf[True] / t_ours}


def bench_finetune(args):
    """One JSTS fine-tuning step (forward, backward, AdamW step) on the same weights and batches: ours
    (packed, no padding) vs transformers' ModernBertForSequenceClassification (padded batch + attention mask).
    The base model's width, fewer layers; 32 sentence pairs of JSTS-like lengths; regression (MSE)."""
    import tempfile
    import transformers
    from model import ModernBertConfig, ModernBertForSequenceClassification
    layers, batch, max_len = (2, 32, 96) if args.quick else (6, 32, 128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ModernBertConfig.preset("llm-jp-modernbert-base", num_hidden_layers=layers, num_labels=1)
    torch.manual_seed(0)
    ours = ModernBertForSequenceClassification(config).to(device)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.ModernBertForSequenceClassification.from_pretrained(d, num_labels=1).to(device)
    batches = []
    for seed in range(4):  # JSTS pairs: mostly 20-60 tokens, a few long ones
        lengths = document_lengths(batch, max_len, seed=seed)
        mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
        ids = torch.randint(8, config.vocab_size, (batch, max_len)).masked_fill(mask == 0, config.pad_token_id)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
        batches.append({"padded": (ids.to(device), mask.to(device)), "packed": (ids[mask.bool()].to(device),
                        cu.to(device), int(lengths.max())), "y": (torch.rand(batch) * 5).to(device)})
    optims = {m: torch.optim.AdamW(m.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
              for m in (ours, theirs)}
    sync = torch.cuda.synchronize if device == "cuda" else None
    at = {"ours": 0, "theirs": 0}

    def step(name):
        b = batches[at[name] % len(batches)]
        at[name] += 1
        if name == "ours":
            ids, cu, m = b["packed"]
            loss = ours(ids, labels=b["y"], cu_seqlens=cu, max_seqlen=m)[1]
        else:
            ids, mask = b["padded"]
            loss = torch.nn.functional.mse_loss(theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1), b["y"])
        loss.backward()
        optims[ours if name == "ours" else theirs].step()
        optims[ours if name == "ours" else theirs].zero_grad(set_to_none=True)
        return loss.item()

    ours.train(), theirs.train()
    first = {name: step(name) for name in at}  # same weights, same first batch: the same loss
    assert abs(first["ours"] - first["theirs"]) < 1e-3 * max(1.0, abs(first["theirs"])), f"losses differ: {first}"
    t = compare({"ours": lambda: step("ours"), "theirs": lambda: step("theirs")}, iters=3 if args.quick else 5, sync=sync)
    real = sum(int(b["packed"][1][-1]) for b in batches) / len(batches)
    print(f"llm-jp-modernbert-base width with {layers} of its 22 layers; {batch} pairs x <= {max_len} tokens, "
          f"{real:.0f} real tokens per batch on average; fwd+bwd+AdamW, fp32, {device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'model':<52}{'ms/step':>10}{'ours faster':>13}")
    for name, label in (("ours", "ours (packed)"), ("theirs", "transformers ModernBertForSequenceClassification")):
        print(f"{label:<52}{t[name] * 1e3:>10.1f}{t[name] / t['ours']:>12.2f}x")
    return {"layers": layers, "batch": batch, "max_len": max_len, "ms_ours": t["ours"] * 1e3,
            "ms_transformers": t["theirs"] * 1e3, "speedup": t["theirs"] / t["ours"]}


def bench_grid(args):
    """The JGLUE fine-tuning grid as `evaluate.py --task jglue` runs it, in one process and under torchrun on 2
    processes, one thread each, side by side on the same runs (a tiny model, the demo sets, a small grid of
    `paper` runs of 1-3 epochs): wall time of each command, start-up included, and their ratio; the two must
    write the same numbers."""
    import tempfile
    import data
    import demo
    from model import ModernBERT, ModernBertConfig
    lrs, epochs, limit = (["1e-4", "3e-4"], ["1", "2"], "60") if args.quick else (["1e-4", "2e-4", "3e-4", "4e-4"],
                                                                                 ["1", "2", "3"], "200")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = demo.write_demo(root / "data" / "demo", n_docs=300)
        tok = data.Tokenizer(data.train_tokenizer(paths["corpus"], 1000, root / "tok.model"))
        torch.manual_seed(0)
        ModernBERT(ModernBertConfig.preset("tiny", vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                                           cls_token_id=tok.cls_id, sep_token_id=tok.sep_id,
                                           mask_token_id=tok.mask_id)).save_pretrained(root / "model")
        command = [str(REPO / "evaluate.py"), "--task", "jglue", "--model", "model", "--tokenizer", "tok.model",
                   "--quick", "--grid", "paper", "--lrs", *lrs, "--epochs", *epochs, "--limit", limit,
                   "--max_len", "64"]
        launchers = {"1 process": [sys.executable], "2 processes": [sys.executable, "-m", "torch.distributed.run",
                                                                     "--standalone", "--nproc_per_node=2"]}

        results = {}

        def run(name):
            out = root / name.replace(" ", "_")
            proc = subprocess.run([*launchers[name], *command, "--out", str(out)], cwd=root, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                raise Problem(f"grid: {name}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            results[name] = json.loads((out / "jglue.json").read_text())["results"]
        t = compare({name: lambda name=name: run(name) for name in launchers}, warmup=0, iters=1 if args.quick else 3)
        same = results["1 process"] == results["2 processes"]
    runs = 3 * len(lrs) * len(epochs)
    print(f"{runs} fine-tuning runs (JSTS, JNLI, JCoLA x lrs {' '.join(lrs)} x epochs {' '.join(epochs)}, "
          f"<= {limit} training examples each), tiny model, 1 thread per process, start-up included")
    print(f"{'command':<16}{'s':>8}{'speed-up':>10}")
    for name in launchers:
        print(f"{name:<16}{t[name]:>8.1f}{t['1 process'] / t[name]:>9.2f}x")
    print(f"the same numbers on 1 and 2 processes: {same}")
    return {"runs": runs, "s_1": t["1 process"], "s_2": t["2 processes"], "ratio": t["1 process"] / t["2 processes"],
            "same_numbers": same}


def bench_ppl(args):
    """Pseudo-perplexity as evaluate.py computes it (distinct masked copies packed without padding, only the
    masked token decoded) vs the same method done the plain way with transformers' ModernBertForMaskedLM
    (batches of 5 masked copies, logits for every position). Same weights, fp32; the PPLs must agree."""
    import tempfile

    from transformers import AutoModelForMaskedLM

    from evaluate import draw_positions, pseudo_perplexity
    from model import ModernBERT, ModernBertConfig

    torch.manual_seed(0)
    # the llm-jp vocabulary (99,574 pieces) on a small trunk, so that a CPU run takes minutes
    config = ModernBertConfig.preset("llm-jp-modernbert-base", hidden_size=256, intermediate_size=384,
                                     num_hidden_layers=6, num_attention_heads=4)
    lengths, n_positions = ([64, 256], 20) if args.quick else ([128, 512, 1024], 100)
    specials = {config.pad_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id}
    docs = [torch.cat([torch.tensor([config.cls_token_id]), torch.randint(8, config.vocab_size, (n - 2,)),
                       torch.tensor([config.sep_token_id])]) for n in lengths]
    positions = draw_positions(docs, specials, n_positions, seed=0)
    ours = ModernBERT(config).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = AutoModelForMaskedLM.from_pretrained(d).eval()

    @torch.no_grad()
    def plain():
        ppl = []
        for ids, pos in zip(docs, positions):
            ce = []
            for chunk in pos.split(5):
                copies = ids.repeat(len(chunk), 1)  # (copies, seqlen)
                rows = torch.arange(len(chunk))
                copies[rows, chunk] = config.mask_token_id
                logits = theirs(input_ids=copies).logits  # (copies, seqlen, vocab)
                ce.append(torch.nn.functional.cross_entropy(logits[rows, chunk], ids[chunk], reduction="none"))
            ppl.append(torch.cat(ce).mean().exp().item())
        return ppl

    results = {}

    def run_ours():
        results["ours"] = pseudo_perplexity(ours, docs, positions, config.mask_token_id)

    def run_plain():
        results["transformers"] = plain()

    t = compare({"ours": run_ours, "transformers": run_plain}, warmup=0, iters=1)  # minutes each on a CPU
    t_ours, t_plain = t["ours"], t["transformers"]
    worst = max(abs(a - b) / b for a, b in zip(results["ours"], results["transformers"]))
    tokens = n_positions * sum(lengths)
    print(f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
          f"documents of {lengths} tokens, {n_positions} masked copies each ({tokens:,} tokens)")
    print(f"{'ours (packed, distinct copies, masked tokens decoded)':<58} {t_ours:8.2f} s")
    print(f"{'transformers (5 copies per batch, all tokens decoded)':<58} {t_plain:8.2f} s")
    print(f"speed-up {t_plain / t_ours:.2f}x; PPL per document ours {[round(p, 2) for p in results['ours']]}, "
          f"transformers {[round(p, 2) for p in results['transformers']]}; max relative difference {worst:.1e}")
    assert worst < 1e-3, f"pseudo-perplexities disagree (relative difference {worst:.1e})"
    return {"lengths": lengths, "positions": n_positions, "ours_s": t_ours, "transformers_s": t_plain,
            "speedup": t_plain / t_ours, "max_rel_diff": worst}


def bench_attention(args):
    """Our Triton varlen attention against, in the same run, torch SDPA's flash kernel on the padded batch
    (global only) and torch's varlen_attn (FA2, where this torch has it): 64k packed tokens (--quick: 8k) in
    sequences of 1k and of 8k, 12 heads, head_dim 64, bf16, global and window 64, ours first in each pair
    and a headline row (ours vs the fastest baseline) after it; then ours with the FlashAttention-2 style
    backward (atomic dq), and RoPE's time as a share of ours. With --flex, ours against compiled
    FlexAttention with a document + sliding-window block mask (built outside the timing) instead: its
    compilation (mask and kernel for each of the 4 pairs) is slow, so `bench.py gpu` runs it as a part of its
    own. FLOPs count the keys inside the window only; fwd+bwd counts 3.5x the forward (5 matmuls backward, 2
    forward). With --stream, each figure is also printed as a JSON line (FIGURE) the moment it is measured."""
    if not torch.cuda.is_available():
        raise Problem("bench.py attention: needs a CUDA GPU (the Triton kernels run compiled only there)")
    import modernbert_kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if args.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    n_heads, head_dim, total, reps = 12, 64, 8192 if args.quick else 65536, 10
    print(f"{total:,} tokens, {n_heads} heads, head_dim {head_dim}, bf16; ms per call (median of 10 runs of "
          f"{reps} calls); 'ours faster' = their time / our time; max |diff| = output vs ours")
    print(f"{'seqlen':>6} {'window':>6}  {'implementation':<24} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>10} "
          f"{'TFLOP/s':>8} {'ours faster: fwd, fwd+bwd':>25} {'max |diff|':>10}")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(total, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))  # (total_tokens, n_heads, head_dim)
    pairs = [(1024, None), (1024, 64), (8192, None), (8192, 64)]
    results = []

    def record(row):
        results.append(row)
        emit(args, row)

    def time_it(seqlen, window, name, to_layout, from_layout, attn, ours=None):
        """Time one contender on this (seqlen, window); print and record its row. `ours` = our row of the
        pair (None when timing ours). Returns the row, or None when a baseline fails on this torch or GPU."""
        batch = total // seqlen
        pos = torch.arange(seqlen)
        w = seqlen if window is None else window
        visible_pairs = batch * int(((pos + w).clamp(max=seqlen - 1) - (pos - w).clamp(min=0) + 1).sum())
        fwd_flops = 4 * visible_pairs * head_dim * n_heads
        leaves = [to_layout(x).detach().requires_grad_() for x in (q, k, v)]
        grad = to_layout(do)

        def fwd():
            with torch.no_grad():
                for _ in range(reps):
                    attn(*leaves)

        def fwd_bwd():
            for _ in range(reps):
                torch.autograd.grad(attn(*leaves), leaves, grad)

        try:
            out = from_layout(attn(*leaves).detach()).float()
            t_fwd = timeit(fwd, warmup=2, iters=10, sync=torch.cuda.synchronize) / reps
            t_all = timeit(fwd_bwd, warmup=2, iters=10, sync=torch.cuda.synchronize) / reps
        except Exception as e:  # a baseline this torch or GPU cannot run is reported, not fatal
            if ours is None:
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            print(f"{seqlen:>6} {str(window):>6}  {name:<24} failed: {reason}")
            record({"seqlen": seqlen, "window": window, "impl": name, "failed": reason})
            return None
        row = {"seqlen": seqlen, "window": window, "impl": name, "fwd_ms": t_fwd * 1e3,
               "fwd_tflops": fwd_flops / t_fwd / 1e12, "fwd_bwd_ms": t_all * 1e3,
               "fwd_bwd_tflops": 3.5 * fwd_flops / t_all / 1e12}
        ref = ours or row
        row.update(ours_faster_fwd=row["fwd_ms"] / ref["fwd_ms"],
                   ours_faster_fwd_bwd=row["fwd_bwd_ms"] / ref["fwd_bwd_ms"],
                   max_abs_diff=0.0 if ours is None else (out - ref["_out"]).abs().max().item())
        print(f"{seqlen:>6} {str(window):>6}  {name:<24} {row['fwd_ms']:8.3f} {row['fwd_tflops']:8.1f} "
              f"{row['fwd_bwd_ms']:10.3f} {row['fwd_bwd_tflops']:8.1f} {row['ours_faster_fwd']:7.2f}x "
              f"{row['ours_faster_fwd_bwd']:7.2f}x {row['max_abs_diff']:10.2e}")
        record(row)
        return {**row, "_out": out} if ours is None else row

    def ours(seqlen, window, deterministic=True):
        cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device="cuda")
        return lambda q, k, v: modernbert_kernels.flash_attn_varlen(q, k, v, cu, seqlen, window=window,
                                                         deterministic=deterministic)

    def baselines(seqlen, window):
        """name: (layout in, layout out, attention on that layout) of each baseline for this pair."""
        batch = total // seqlen
        same = lambda x: x
        if args.flex:
            w = seqlen if window is None else window

            def visible(b, h, q_idx, kv_idx):  # same document and inside the window
                return (q_idx // seqlen == kv_idx // seqlen) & ((q_idx - kv_idx).abs() <= w)

            masks = []  # built on the first call, before the timing, where a failure is reported

            def flex_attn(q, k, v):
                if not masks:
                    masks.append(create_block_mask(visible, None, None, total, total, device="cuda", _compile=True))
                return flex(q, k, v, block_mask=masks[0])

            flat = lambda x: x.transpose(0, 1).unsqueeze(0).contiguous()  # (1, H, total_tokens, D)
            return {"flex_attention": (flat, lambda x: x[0].transpose(0, 1), flex_attn)}
        found = {}
        if window is None:
            def sdpa(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            padded = lambda x: x.view(batch, seqlen, n_heads, head_dim).transpose(1, 2).contiguous()  # (B, H, L, D)
            found["sdpa flash (padded)"] = (padded, lambda x: x.transpose(1, 2).reshape(total, n_heads, head_dim), sdpa)
        if varlen_attn is not None:  # window_size only where needed: older torch lacks the argument
            cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device="cuda")
            band = {} if window is None else {"window_size": (window, window)}
            found["varlen_attn"] = (same, same, lambda q, k, v: varlen_attn(q, k, v, cu, cu, seqlen, seqlen, **band))
        return found

    fa = modernbert_kernels.flash_attn
    ours_rows = {}
    for seqlen, window in pairs:  # the headline: ours against the fastest baseline of each pair
        mine = time_it(seqlen, window, "triton (ours)", lambda x: x, lambda x: x, ours(seqlen, window))
        ours_rows[seqlen, window] = mine
        theirs = [time_it(seqlen, window, name, *c, ours=mine) for name, c in baselines(seqlen, window).items()]
        theirs = [r for r in theirs if r is not None]
        if theirs:
            best = min(theirs, key=lambda r: r["fwd_bwd_ms"])
            record({"seqlen": seqlen, "window": window, "headline": "ours vs the fastest baseline",
                    "baseline": best["impl"], "ours_fwd_bwd_ms": mine["fwd_bwd_ms"],
                    "baseline_fwd_bwd_ms": best["fwd_bwd_ms"], "ours_faster_fwd": best["ours_faster_fwd"],
                    "ours_faster_fwd_bwd": best["ours_faster_fwd_bwd"]})
        tuned = [(kern.fn.__name__, kern.best_config) for kern in (fa._fwd_kernel, fa._bwd_dq_kernel,
                                                                    fa._bwd_dkdv_kernel)]
        print(f"{'':15}autotuned (BLOCK_M x BLOCK_N, warps, stages): " + "; ".join(
            f"{n} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} {c.num_warps} {c.num_stages}" for n, c in tuned))
    if args.flex:
        return results
    for seqlen, window in pairs:  # the other backward
        time_it(seqlen, window, "triton, atomic dq bwd", lambda x: x, lambda x: x,
                ours(seqlen, window, deterministic=False), ours=ours_rows[seqlen, window])

    # RoPE runs as its own kernel before attention; its share of attention's time is what fusing it into the
    # attention kernels' Q/K loads could save at most (and fusing repeats the rotation per query block)
    qkv = torch.randn(total, 3, n_heads, head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    cos, sin = (torch.randn(total, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grads = [torch.randn(total, n_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def rope_fwd():
        with torch.no_grad():
            for _ in range(reps):
                modernbert_kernels.apply_rotary(qkv[:, 0], qkv[:, 1], cos, sin)

    def rope_fwd_bwd():
        for _ in range(reps):
            torch.autograd.grad(modernbert_kernels.apply_rotary(qkv[:, 0], qkv[:, 1], cos, sin), qkv, grads)

    t_fwd = timeit(rope_fwd, warmup=2, iters=10, sync=torch.cuda.synchronize) / reps
    t_all = timeit(rope_fwd_bwd, warmup=2, iters=10, sync=torch.cuda.synchronize) / reps
    shares = {f"{L}_{w}": t_all * 1e3 / r["fwd_bwd_ms"] for (L, w), r in ours_rows.items()}
    print(f"RoPE kernel on q and k: fwd {t_fwd * 1e3:.3f} ms, fwd+bwd {t_all * 1e3:.3f} ms = " + ", ".join(
        f"{share:.1%} of ours at seqlen {key.replace('_', ' window ')}" for key, share in shares.items()))
    record({"impl": "rope (separate kernel)", "fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3,
            "share_of_ours_fwd_bwd": shares})
    return results


# bench.py gpu's parts, in order, with the seconds each may take (what one leaves unused passes on). The
# tests compile most of the Triton kernels (into Triton's cache, for the parts after); FlexAttention's
# compilation comes last, in a part of its own, so that it cannot take time from the headline figures.
GPU_PARTS = [("tests", 170), ("attention", 85), ("train, eager", 60), ("train, compiled", 100), ("flex", 35)]


def gpu_usage():
    """What `bench.py gpu` writes and how long it may take (part of --help)."""
    budget = sum(seconds for _, seconds in GPU_PARTS)
    return (f"bench.py gpu --out DIR writes only into DIR: DIR/gpu.jsonl, one JSON line per figure (each test's "
            f"outcome, each timing, each part's status) with device, date, commit and versions, appended the "
            f"moment the figure is measured; and DIR/gpu_<part>.log, each part's output as it comes. Time budget "
            f"{budget} s ({budget / 60:.1f} min) from a cold Triton cache: " +
            "; ".join(f"{part} {seconds} s" for part, seconds in GPU_PARTS) +
            "; in that order, unused time passing on. A part still running at its end is killed and reported "
            "as timed out, with every figure it measured already in gpu.jsonl.")


def gpu_commands(args):
    """{part: [argv, ...]}: the processes of each part of GPU_PARTS, run side by side within the part."""
    bench = [sys.executable, str(REPO / "bench.py")]
    pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
    quick = ["--quick"] if args.quick else []
    # three pytest processes side by side on the one GPU: each spends most of its time compiling kernels on
    # a CPU core (~1 s per config), and the compiled kernels land in Triton's cache for the parts after
    return {"tests": [pytest + ["tests/test_kernels.py", "-k", "flash_attn_gpu_bf16"],
                      pytest + ["tests/test_kernels.py", "-k", "gpu_head_dims or rotary_gpu"],
                      pytest + ["tests/test_kernels.py", "tests/test_model.py", "-k",
                                "(gpu or cuda or model_on_kernels) and not flash_attn_gpu_bf16 and not "
                                "gpu_head_dims and not rotary_gpu"]],
            "attention": [bench + ["attention", "--stream", *quick]],
            "train, eager": [["env", "TORCHDYNAMO_DISABLE=1", *bench, "train", "--quick", "--stream"]],
            "train, compiled": [bench + ["train", "--quick", "--stream"]],
            "flex": [bench + ["attention", "--flex", "--stream", *quick]]}


TEST_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def run_parts(parts, out_dir, env):
    """Run (name, seconds, commands) parts one after another: a part's commands side by side, each in a
    process group of its own with PYTHONUNBUFFERED=1, until the part's end (the sum of the seconds so far,
    so that time a part leaves unused passes on), then killed with whatever they started. Each line they
    print goes at once to out_dir/gpu_<part>.log; each figure in it (a FIGURE line, or a `pytest -v`
    outcome) is appended at once to out_dir/gpu.jsonl with `env` and the part's name, one complete line per
    write; a status figure ends each part. Returns (figures as written, {part: (state, seconds)})."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, "gpu.jsonl")
    figures, status, lock = [], {}, threading.Lock()

    def record(figure):
        line = (json.dumps({**env, **figure}) + "\n").encode()
        with lock:
            fd = os.open(jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of one whole line: nothing half-written is ever left
            finally:
                os.close(fd)
            figures.append(figure)

    start = end = time.monotonic()
    for name, seconds, commands in parts:
        t0, end = time.monotonic(), end + seconds
        log = open(os.path.join(out_dir, f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.log"), "w")

        def pump(i, proc):
            for line in proc.stdout:
                with lock:
                    if not log.closed:
                        log.write(line if len(commands) == 1 else f"[{i}] {line}")
                        log.flush()
                outcome = TEST_OUTCOME.match(line)
                if outcome:
                    record({"part": name, "test": outcome[1], "outcome": outcome[2].lower()})
                elif line.startswith(FIGURE):
                    try:
                        record({"part": name, **json.loads(line[len(FIGURE):])})
                    except ValueError:  # a line cut short: the log has it
                        pass

        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  start_new_session=True) for cmd in commands]
        readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for reader in readers:
            reader.start()
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
            try:  # the command's process group: it, and what it left running (compile workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for reader in readers:  # the pipes close once the groups are gone
            reader.join(timeout=10)
        with lock:
            log.close()
        failed = [c for c in codes if c != 0]
        state = "ok" if not failed else (f"timeout after {end - t0:.0f} s" if "timeout" in failed
                                         else f"exit {failed[0]}")
        status[name] = (state, time.monotonic() - t0)
        record({"part": name, "status": state, "seconds": round(time.monotonic() - t0, 1)})
        print(f"[{time.monotonic() - start:5.0f} s] {name}: {state}", flush=True)
    return figures, status


def print_gpu_summary(env, figures, status):
    """The summary table of bench.py gpu: parts, tests, the headline, every attention and training row."""
    print(f"\n# summary: {env['device']}, torch {env['torch']}, triton {env.get('triton')}, commit {env['commit']}")
    print(f"{'part':<18}{'status':<26}{'seconds':>8}")
    for part, (state, seconds) in status.items():
        print(f"{part:<18}{state:<26}{seconds:>8.0f}")
    tests = [(f["test"], f["outcome"]) for f in figures if "test" in f]
    counts = {o: sum(outcome == o for _, outcome in tests) for o in ("passed", "failed", "error", "skipped")}
    print("tests: " + ", ".join(f"{n} {o}" for o, n in counts.items()) +
          "".join(f"\n  {o}: {name}" for name, o in tests if o in ("failed", "error")))
    timed = [f for f in figures if "seqlen" in f and "fwd_bwd_ms" in f]
    ours = {(f["seqlen"], f["window"]): f for f in timed if f["impl"] == "triton (ours)" and f["part"] == "attention"}
    if ours:
        print(f"{'seqlen':>6} {'window':>6}  {'ours vs the fastest baseline (fwd+bwd ms)':<44}{'ours faster':>12}")
        for (seqlen, window), mine in ours.items():
            theirs = [f for f in timed if (f["seqlen"], f["window"]) == (seqlen, window)
                      and not f["impl"].startswith("triton")]
            best = min(theirs, key=lambda f: f["fwd_bwd_ms"], default=None)
            vs = f"{best['impl']} {best['fwd_bwd_ms']:.3f}" if best else "no baseline ran"
            pair = f"{mine['fwd_bwd_ms']:.3f} vs {vs}"
            print(f"{seqlen:>6} {str(window):>6}  {pair:<44}" +
                  (f"{best['fwd_bwd_ms'] / mine['fwd_bwd_ms']:>11.2f}x" if best else ""))
        print(f"{'seqlen':>6} {'window':>6}  {'attention':<24}{'part':<10}{'fwd ms':>8}{'fwd+bwd ms':>11}"
              f"{'TFLOP/s':>8}{'ours faster':>12}")
        for f in timed:  # flex's ratios are against ours timed again in its own part
            print(f"{f['seqlen']:>6} {str(f['window']):>6}  {f['impl']:<24}{f['part']:<10}{f['fwd_ms']:>8.3f}"
                  f"{f['fwd_bwd_ms']:>11.3f}{f['fwd_bwd_tflops']:>8.1f}{f['ours_faster_fwd_bwd']:>11.2f}x")
    train = [f for f in figures if "tokens_per_s" in f]
    if train:
        print(f"{'train':<26}{'compile':>8}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}")
        for f in train:
            print(f"{f['stage'] + ' ' + f['lengths']:<26}{str(f['compile']):>8}{f['tokens_per_s']:>11,.0f}"
                  f"{f['mfu']:>7.1%}{f['peak_mem_gib']:>10.1f}")


def bench_gpu(args):
    """Everything the kernels and the training step need checked and timed on a GPU, in one call held to a
    7.5-minute budget from a cold Triton cache (GPU_PARTS):
      1. tests: the CUDA tests of tests/test_kernels.py and tests/test_model.py: the kernels against the fp32
         reference in bf16 and fp16, global and window 64, 1k and 8k sequences, both backward variants,
         int64 offsets, RoPE, and the model on the kernels against the model on the reference;
      2. attention (`bench.py attention`): ours against SDPA and torch's varlen_attn at the stage-1 (1k) and
         stage-2 (8k) sequence lengths, global and window 64, the headline (ours vs the fastest baseline)
         first; then the atomic-dq backward and RoPE;
      3. train (`bench.py train --quick`): tokens/s, MFU, peak memory at the stage-1 and stage-2 shapes, without
         torch.compile (TORCHDYNAMO_DISABLE=1), then with it as the configs set it;
      4. flex (`bench.py attention --flex`): ours against compiled FlexAttention, the same four pairs.
    Each part runs in its own processes under its time limit (run_parts), so a failure, crash or hang is
    recorded and the next part still runs; every figure reaches DIR/gpu.jsonl the moment it is measured
    (gpu_usage). A summary table is printed last. Exits 1 if any part failed. --quick passes on to
    attention (8k tokens instead of 64k: a smoke test, not a measurement)."""
    if not args.out:
        raise Problem("bench.py gpu: --out DIR is required (the directory for gpu.jsonl and the part logs)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise Problem(f"bench.py gpu: --out {args.out} is a file; it must be a directory")
    if not torch.cuda.is_available():
        raise Problem("bench.py gpu: needs a CUDA GPU, and none is visible")
    out_dir, args.out = args.out, None  # the figures go to out_dir/gpu.jsonl, instead of main's one line
    import triton
    env = {**environment(), "triton": triton.__version__, "cuda": torch.version.cuda}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    commands = gpu_commands(args)
    figures, status = run_parts([(part, seconds, commands[part]) for part, seconds in GPU_PARTS], out_dir, env)
    print_gpu_summary(env, figures, status)
    if any(state != "ok" for state, _ in status.values()):
        sys.exit(1)


PAPER_GPUS = 16  # the paper's stage-1 and stage-2 runs (Table 1)


def stage_config(stage):
    """The settings of configs/{stage}.py as train.py reads them (defaults filled in, every key checked), a dict."""
    import train
    return asdict(train.load_config([stage])[0])


def train_micro_batches(cfg, kind, generator, world=PAPER_GPUS):
    """Rank 0's micro-batches of one global batch of the config, as train.py deals them on `world` processes,
    each a list of sequence lengths: by token budget (data.pack_by_tokens, a lone <CLS> <SEP> for an empty
    one) when the config sets micro_batch_tokens, else by count. Lengths: "documents" draws them log-normally
    (median 400 tokens, truncated at max_seqlen), "full" fills every sequence (the memory worst case)."""
    import data
    max_len, n = cfg["max_seqlen"], cfg["batch_size"]
    if kind == "full":
        lengths = torch.full((n,), max_len)
    else:
        lengths = (400 * torch.exp(1.1 * torch.randn(n, generator=generator))).round().clamp(8, max_len).long()
    lengths = lengths.tolist()
    if cfg.get("micro_batch_tokens"):
        plan = data.pack_by_tokens(lengths, cfg["micro_batch_tokens"], world)[0]
        return [[lengths[k] for k in m] if m else [2] for m in plan]
    share = lengths[:n // world]
    return [share[a:a + cfg["micro_batch_size"]] for a in range(0, len(share), cfg["micro_batch_size"])]


def bench_train(args):
    """Training steps of llm-jp-modernbert-base on one GPU as train.py runs them (FSDP2, bf16 compute with fp32
    weights and reductions, the config's compile / activation checkpointing / micro-batches, AdamW, clipping),
    at the stage-1 and stage-2 shapes of configs/stage1.py and stage2.py: rank 0's micro-batches of a global
    batch on the paper's 16 GPUs (train_micro_batches), "documents" lengths measured first for both stages
    (the headline figures), then "full". --quick times at most 4 micro-batches of each step (the row says how
    many of the step's it timed). Synthetic ids, 30% of tokens labelled. Each measurement builds its model
    afresh, so that its peak memory is its own. Tokens/s counts real tokens; MFU against the bf16 dense peak
    of an H100/H200. TORCHDYNAMO_DISABLE=1 runs without torch.compile (the rows say which ran). With --stream,
    each row is also printed as a JSON line (FIGURE) the moment it is measured."""
    if not torch.cuda.is_available():
        raise Problem("bench.py train: needs a CUDA GPU, and none is visible")
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from model import IGNORE_INDEX, ModernBERT, ModernBertConfig, parallelize
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cuda", (1,))
    warmup, steps = (1, 2) if args.quick else (2, 5)
    dynamo_off = os.environ.get("TORCHDYNAMO_DISABLE") == "1"
    results = []
    print(f"{'shape':<26}{'micro-steps':>12}{'tokens/step':>12}{'s/step':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}")
    for kind in ("documents", "full"):
        for stage in ("stage1", "stage2"):
            cfg = stage_config(stage)
            compiled = bool(cfg.get("compile")) and not dynamo_off
            config = ModernBertConfig.preset("llm-jp-modernbert-base")
            torch.manual_seed(0)
            model = parallelize(ModernBERT(config).cuda(), mesh, torch.bfloat16, bool(cfg.get("compile")),
                                bool(cfg.get("activation_checkpointing")))  # as train.py wraps it
            optimizer = model.configure_optimizers(1e-5, 1e-4, (0.9, 0.98), 1e-6, "cuda")
            g = torch.Generator().manual_seed(0)

            def micro_batch(lengths):
                lengths = torch.tensor(lengths)
                ids = torch.randint(8, config.vocab_size, (int(lengths.sum()),), generator=g)
                labels = torch.where(torch.rand(len(ids), generator=g) < 0.3, ids, IGNORE_INDEX)
                cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
                return ids.cuda(), labels.cuda(), cu.cuda(), int(lengths.max()), lengths.tolist(), int((labels >= 0).sum())

            plans = [train_micro_batches(cfg, kind, g) for _ in range(warmup + steps)]
            timed = min(len(p) for p in plans) if not args.quick else min(4, *map(len, plans))
            batches = [[micro_batch(m) for m in plan[:timed]] for plan in plans]

            def step(batch):
                masked = sum(mb[5] for mb in batch)
                for ids, labels, cu, m, _, n in batch:
                    _, loss = model(ids, labels=labels, cu_seqlens=cu, max_seqlen=m)
                    (loss * (n / max(masked, 1))).backward()  # train.py's weighting over the step's masked tokens
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for batch in batches[:warmup]:  # compilation, autotuning, optimizer state
                step(batch)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for batch in batches[warmup:]:
                step(batch)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / steps
            seqlens = [n for batch in batches[warmup:] for mb in batch for n in mb[4]]
            predicted = sum(mb[5] for batch in batches[warmup:] for mb in batch)
            tokens = sum(seqlens) / steps
            row = {"stage": stage, "lengths": kind, "max_seqlen": cfg["max_seqlen"],
                   "micro_batch_tokens": cfg.get("micro_batch_tokens", 0),
                   "micro_batch_size": None if cfg.get("micro_batch_tokens") else cfg["micro_batch_size"],
                   "micro_steps_timed": timed, "micro_steps_of_step": len(plans[-1]), "world": PAPER_GPUS,
                   "compile": compiled, "activation_checkpointing": bool(cfg.get("activation_checkpointing")),
                   "tokens_per_step": tokens, "s_per_step": seconds, "tokens_per_s": tokens / seconds,
                   "mfu": model.estimate_mfu(seqlens, predicted, seconds * steps),
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
            results.append(row)
            shape, micro_steps = f"{stage} {cfg['max_seqlen']} {kind}", f"{timed}/{len(plans[-1])}"
            print(f"{shape:<26}{micro_steps:>12}{tokens:>12,.0f}"
                  f"{seconds:>9.3f}{row['tokens_per_s']:>11,.0f}{row['mfu']:>7.1%}{row['peak_mem_gib']:>10.1f}")
            emit(args, row)
            del model, optimizer, batches
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return results


# Japanese Wikipedia's document lengths in llm-jp tokens, as a lognormal: the mean from LLM-jp corpus v1.0.1
# (github.com/llm-jp/llm-jp-corpus: Wikipedia (ja) 1.5B tokens) over the 1.35M articles of a Japanese
# Wikipedia dump (huggingface.co/datasets/fujiki/llm-japanese-dataset_wikipedia, 1.35M rows) = 1,110
# tokens; the shape from Wikipedia's own article-size statistics (Wikipedia:Statistics, 2002: median 997,
# mean 1,997 bytes, so sigma = sqrt(2 ln(mean / median)) = 1.18; English Wikipedia, the only published median
# we found), rounded to 1.2: median ~540 tokens, ~1% of documents over 8,192.
JAWIKI_MEAN_TOKENS, JAWIKI_SIGMA = 1110, 1.2
STAGES = {stage: (c["max_seqlen"], c["batch_size"], c["micro_batch_size"])  # max_seqlen, batch, micro-batch
          for stage in ("stage1", "stage2") for c in [stage_config(stage)]}
STEP_SECONDS = {"stage1": 8 * 86400 / 500_000, "stage2": 3 * 86400 / 200_000}  # the paper's steps, on 16 H100s
SCALE_MEAN_TOKENS = 600  # mean document length assumed for a web-scale corpus (web pages are shorter than articles)
LLMJP_LAYOUT = {"file": "none", "sha256": "0" * 64, "vocab_size": 99574, "unk_id": 0, "mask_id": 3, "pad_id": 4,
                "cls_id": 5, "sep_id": 6, "eod_id": 7, "special_ids": list(range(8))}
BASELINE_DATA = "e0340e054b6e345b64f23a9c984cdf3740fb4db7"  # git blob: data.py as it was before the loader at scale


def data_budget(args):
    """bench.py data --budget: per optimizer step, micro-steps, tokens per micro-step and fill (tokens /
    peak tokens per micro-step) for the stage-1 and stage-2 recipes on 16 GPUs, micro-batches of a fixed
    number of sequences (the stage configs' micro_batch_size) vs by token budget (micro_batch_tokens = the
    same peak: micro_batch_size x max_seqlen), on two length distributions: the demo corpus (its own
    tokenizer) and Japanese Wikipedia (JAWIKI_* above). Target: stage 2, >= 4x fewer micro-steps."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import sentencepiece as spm

    import data
    import demo
    world, n_batches = 16, 5 if args.quick else 40
    rng = np.random.default_rng(0)
    mu = np.log(JAWIKI_MEAN_TOKENS) - JAWIKI_SIGMA ** 2 / 2
    lengths = {"jawiki": np.maximum(1, rng.lognormal(mu, JAWIKI_SIGMA, 1_000_000).round()).astype(np.int64) + 2}
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo.write_demo(Path(tmp), n_docs=1000 if args.quick else 3000)
        tok = data.train_tokenizer(paths["corpus"], 1500, Path(tmp) / "tokenizer.model")
        texts = [record["text"] for _, record in data.read_jsonl(paths["corpus"])]
        sp = spm.SentencePieceProcessor(model_file=str(tok))
        lengths["demo"] = np.array([len(ids) + 2 for ids in sp.encode(texts)], dtype=np.int64)
    results = {}
    print(f"{world} ranks, {n_batches} global batches each; tokens per micro-step: mean over every rank's micro-steps, "
          "empty ones included; target: stage 2 on jawiki >= 4x fewer micro-steps by budget")
    print(f"{'':22}{'micro-steps':>12}{'tokens/micro-step':>19}{'fill':>7}{'peak':>8}{'fewer':>8}")
    for name, lens in lengths.items():
        print(f"{name}: {len(lens):,} documents, mean {lens.mean():,.0f} tokens, median {np.median(lens):,.0f}, "
              f"{(lens > 8192).mean():.1%} over 8,192")
        for stage, (L, G, micro) in STAGES.items():
            budget = micro * L
            steps = {"count": [], "budget": []}
            peak = {"count": 0, "budget": 0}
            tokens = 0
            for _ in range(n_batches):
                t = np.minimum(rng.choice(lens, G), L)
                tokens += int(t.sum())
                steps["count"].append(G // (world * micro))
                peak["count"] = max(peak["count"], int(t.reshape(-1, micro).sum(1).max()))
                plan = data.pack_by_tokens(t, budget, world)
                steps["budget"].append(len(plan[0]))
                peak["budget"] = max(peak["budget"], max(int(t[m].sum()) for p in plan for m in p if m))
            entry = {}
            for how in ("count", "budget"):
                mean_steps = float(np.mean(steps[how]))
                per_step = tokens / (world * sum(steps[how]))
                entry[how] = {"micro_steps": mean_steps, "max_micro_steps": max(steps[how]),
                              "tokens_per_micro_step": per_step, "fill": per_step / budget, "peak_tokens": peak[how]}
            ratio = entry["count"]["micro_steps"] / entry["budget"]["micro_steps"]
            entry["fewer_micro_steps"] = ratio
            for how in ("count", "budget"):
                e = entry[how]
                label = f"  {stage} {how} {micro if how == 'count' else budget:,}"
                print(f"{label:22}{e['micro_steps']:>12.2f}{e['tokens_per_micro_step']:>19,.0f}{e['fill']:>7.0%}"
                      f"{e['peak_tokens']:>8,}" + (f"{ratio:>7.1f}x" if how == "budget" else ""))
            results[f"{name}_{stage}"] = {"max_seqlen": L, "batch_size": G, "world": world, "micro_batch_size": micro,
                                          "micro_batch_tokens": budget, **entry}
    return results


def synthetic_shards(out, n_docs, n_shards, tokenizer=LLMJP_LAYOUT, mean_tokens=SCALE_MEAN_TOKENS, sparse=False,
                     seed=0, val_docs=0):
    """A shard directory in data.py's format without a tokenizer or text: n_docs train documents over n_shards
    shards (and val_docs val documents over at most as many), lengths lognormal with the given mean and sigma
    JAWIKI_SIGMA, ids uniform over the tokenizer's non-special ids; files and hashes as prepare writes them, on
    disk (fsynced: the page cache can drop them). sparse: every .bin a hole of the right size (all <unk>, no
    disk used; unhashed, so verification refuses it), for directories far larger than the disk; .idx real."""
    import hashlib

    import numpy as np

    import data
    out, rng = Path(out), np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer["vocab_size"] <= 1 << 16 else np.uint32)
    allowed = np.setdiff1d(np.arange(tokenizer["vocab_size"]), tokenizer["special_ids"]).astype(dtype)
    mu = np.log(mean_tokens) - JAWIKI_SIGMA ** 2 / 2
    splits = {}
    for split, docs in (("train", n_docs), ("val", val_docs)):
        entries = []
        for s, n in enumerate(np.diff(np.linspace(0, docs, min(n_shards, docs) + 1).astype(np.int64))):
            lengths = np.maximum(1, rng.lognormal(mu, JAWIKI_SIGMA, n).round()).astype(np.int64)
            name = f"{split}-{s:05d}-{s:010x}"
            if sparse:
                idx = np.concatenate([[0], np.cumsum(lengths)])
                idx.tofile(out / f"{name}.idx")
                with open(out / f"{name}.bin", "wb") as f:
                    f.truncate(int(idx[-1]) * dtype.itemsize)
                entry = {"bin": f"{name}.bin", "idx": f"{name}.idx", "docs": int(n), "tokens": int(idx[-1]),
                         "bin_bytes": int(idx[-1]) * dtype.itemsize, "bin_sha256": "sparse, not hashed",
                         "idx_sha256": hashlib.sha256(idx.tobytes()).hexdigest()}
            else:
                writer = data._ShardWriter(out, name, dtype, "synthetic")
                writer.add(np.split(rng.choice(allowed, int(lengths.sum())), np.cumsum(lengths)[:-1]))
                entry = writer.finish()
                for key in ("bin", "idx"):
                    with open(out / entry[key], "rb") as f:
                        os.fsync(f.fileno())
            entries.append(entry)
        splits[split] = {"docs": int(docs), "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    manifest = {"format": data.FORMAT_VERSION, "tokenizer": tokenizer, "dtype": dtype.name, "text_field": "text",
                "val_fraction": 0.0, "inputs": [], "empty_texts": 0, "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def memory():
    """This process's resident memory, in bytes: anonymous (private to it, unshareable) and the file pages it
    maps that no other process maps (page cache: shared as soon as another process maps them, reclaimable)."""
    kb = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            kb[parts[0].rstrip(":")] = int(parts[1])
    return {"anonymous": kb["Anonymous"] * 1024,
            "file_private": (kb["Private_Clean"] + kb["Private_Dirty"] - kb["Anonymous"]) * 1024}


def read_bytes():
    """Bytes this process has had read from storage (the page cache does not count)."""
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])


def evict(paths):
    """Drop the files' clean pages from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def loader_probe(spec):
    """One loader design (spec["baseline"]: the directory of the old data.py, else ours) on one shard
    directory, rank 0 of spec["world"] at a stage's shapes, in a process of its own (data_scale starts it),
    the shards evicted from the page cache first: Loader() and first-batch time, open files, anonymous memory
    after the first batch and spec["steps"] more, loader time per step with the .bin files evicted before
    every step (cold: a corpus larger than memory) or not, bytes read from storage per byte of document
    delivered. With spec["hide"], ours only: the critical path that prefetch() leaves on a stand-in training
    step of about spec["hide"] ms (its wall time with the next batch built meanwhile, minus its own), for a
    step that launches kernels (small torch ops, taking the GIL between them) and one that waits on the GPU
    (a sleep). Prints one JSON line."""
    import statistics

    if spec["baseline"]:
        sys.path.insert(0, spec["baseline"])
    import data
    torch.set_num_threads(1)
    L, G, micro = STAGES[spec["stage"]]
    dirs = spec.get("mixture") or [spec["dir"]]  # a mixture: its corpora, equal weights
    manifests = {d: json.loads((Path(d) / "manifest.json").read_text()) for d in dirs}
    n_docs = sum(m["splits"]["train"]["docs"] for m in manifests.values())
    itemsize = 2 if manifests[dirs[0]]["dtype"] == "uint16" else 4
    bins = [Path(d) / e["bin"] for d, m in manifests.items() for e in m["splits"]["train"]["shards"]]
    indexes = [Path(d) / e["idx"] for d, m in manifests.items() for e in m["splits"]["train"]["shards"]]
    shapes = dict(batch_size=G, micro_batch_size=micro, max_seqlen=L, rank=0, world_size=spec["world"],
                  micro_batch_tokens=micro * L, verify=False)
    if spec.get("mixture"):
        make = lambda: data.Mixture({d: 1 for d in dirs}, **shapes)  # noqa: E731
    else:
        make = lambda: data.Loader(spec["dir"], **shapes)  # noqa: E731
    evict(bins + indexes)
    if spec.get("cached_index"):  # as a while into a run, when every .idx page has been read once
        for path in indexes:
            path.read_bytes()
    before, read0 = memory(), read_bytes()
    t0 = time.perf_counter()
    loader = make()
    t1 = time.perf_counter()
    batches = iter(loader)
    next(batches)
    t2 = time.perf_counter()
    first, read1, fds = memory(), read_bytes(), len(os.listdir("/proc/self/fd"))
    times, tokens, useful, read = [], 0, 0, 0
    for _ in range(spec["steps"]):
        if spec["cold"]:
            evict(bins)
        r, t = read_bytes(), time.perf_counter()
        micro_batches = next(batches)
        times.append(time.perf_counter() - t)
        read += read_bytes() - r
        for mb in micro_batches:
            if not mb.get("empty"):
                tokens += len(mb["input_ids"])
                useful += (len(mb["input_ids"]) - 2 * (len(mb["cu_seqlens"]) - 1)) * itemsize  # no <CLS>/<SEP>
    steps = memory()
    result = {"startup_s": t1 - t0, "first_batch_s": t2 - t1, "open_files": fds,
              "anonymous_mb_first": (first["anonymous"] - before["anonymous"]) / 1e6,
              "anonymous_mb_steps": (steps["anonymous"] - before["anonymous"]) / 1e6,
              "anonymous_per_doc_first": (first["anonymous"] - before["anonymous"]) / n_docs,
              "anonymous_per_doc_steps": (steps["anonymous"] - before["anonymous"]) / n_docs,
              "file_private_mb_steps": (steps["file_private"] - before["file_private"]) / 1e6,
              "step_ms": 1e3 * statistics.median(times), "tokens_per_step": tokens / spec["steps"],
              "tokens_per_s": tokens / sum(times), "startup_read_mb": (read1 - read0) / 1e6,
              "read_per_useful_byte": read / max(useful, 1)}
    if spec["hide"]:
        x = torch.rand(1 << 12)

        def launching(ops):  # small torch ops in a Python loop, like a step launching kernels
            y = x
            for _ in range(ops):
                y = y * 1.0001 + 0.5
        t = time.perf_counter()
        launching(1000)
        ops = int(1000 * spec["hide"] / 1e3 / (time.perf_counter() - t))
        stand_ins = {"launching": lambda: launching(ops), "waiting": lambda: time.sleep(spec["hide"] / 1e3)}
        for name, stand_in in stand_ins.items():
            alone, walls = [], []
            batches = make().prefetch()
            next(batches)
            for _ in range(min(spec["steps"], 30)):
                if spec["cold"]:
                    evict(bins)
                time.sleep(0.05)  # the thread finishes the batch it builds ahead: the stand-in runs alone
                t = time.perf_counter()
                stand_in()
                alone.append(time.perf_counter() - t)
                t = time.perf_counter()
                next(batches)
                stand_in()  # while the thread builds the next batch
                walls.append(time.perf_counter() - t)
            batches.close()
            result[f"critical_ms_{name}"] = 1e3 * max(0.0, statistics.median(walls) - statistics.median(alone))
        result["stand_in_ms"] = 1e3 * statistics.median(alone)
    print(json.dumps(result))


def data_scale(args):
    """bench.py data --scale: the loader at corpus scale against the design before it (BASELINE_DATA, from
    git), each run in a process of its own, on synthetic shard directories (synthetic_shards: 2,000 shards,
    sparse .bin files) of 1M, 10M and 100M documents, at the stage-1 and stage-2 shapes (configs/stage*.py:
    line_by_line, micro-batches by token budget) as rank 0 of 16 and of 128 processes; the baseline only
    where its per-document arrays fit in memory (<= 10M documents). A dense directory gives the bytes read
    from storage per byte used. Targets: private memory <= 1 byte per document at 100M documents, Loader()
    + first batch < 2 s, open files <= 64, loader time on the critical path < 5% of the step (the paper's
    step time, shortened in proportion for 128 processes), >= 10M tokens/s per process."""
    sizes = [1_000_000] if args.quick else [1_000_000, 10_000_000, 100_000_000]
    steps, n_shards = (20, 2000) if args.quick else (100, 2000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = subprocess.run(["git", "cat-file", "blob", BASELINE_DATA], cwd=REPO, capture_output=True, text=True)
        baseline = tmp / "baseline"
        if old.returncode == 0:
            baseline.mkdir()
            (baseline / "data.py").write_text(old.stdout)
        else:
            print(f"the baseline data.py (git blob {BASELINE_DATA}) is not in this checkout: ours only")

        def probe(**spec):
            spec = {"cold": True, "hide": 0, "steps": steps, "world": 16, "stage": "stage1", **spec}
            run = "import bench, json, sys; bench.loader_probe(json.loads(sys.argv[1]))"
            proc = subprocess.run([sys.executable, "-c", run, json.dumps(spec)], cwd=REPO, capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                raise Problem(f"loader probe {spec} failed:\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.splitlines()[-1])

        designs = {"ours": None, "baseline": str(baseline)} if baseline.is_dir() else {"ours": None}
        print(f"{n_shards:,} shards, document lengths lognormal (mean {SCALE_MEAN_TOKENS}, sigma {JAWIKI_SIGMA}); "
              f"rank 0 of 16 or 128 at the stage shapes (by token budget); the shards evicted from the page cache "
              f"before Loader(); anonymous memory after the first batch and {steps} more, in MB and per document; "
              f"ms/step: median over {steps} steps, the .bin files evicted before each (every read cold; sparse "
              "files: a read costs the kernel's zero-fill, not I/O); critical: loader time left on the critical "
              "path (ours: built by prefetch() during a 100 ms stand-in step that launches small torch ops / that "
              "sleeps, 30 steps; baseline: all of it), and its share of the paper's step (8 days / 500k steps, 3 "
              "days / 200k, on 16 GPUs; 8x shorter on 128)")

        def row(stage, world, name, r):
            """Print one probe's line; its critical path as a share of the paper's step, added to r."""
            critical = [r.get(f"critical_ms_{k}", r["step_ms"]) for k in ("launching", "waiting")]
            r["critical_of_step"] = critical[0] / 1e3 / (STEP_SECONDS[stage] * 16 / world)
            print(f"  {stage} x{world:<4} {name:<12}{r['startup_s']:>9.2f}{r['first_batch_s']:>10.2f}"
                  f"{r['open_files']:>6}{r['anonymous_mb_first']:>8.1f}{r['anonymous_mb_steps']:>8.1f}"
                  f"{r['anonymous_per_doc_steps']:>7.2f}{r['step_ms']:>8.1f}{r['tokens_per_s'] / 1e6:>7.1f}"
                  f"{critical[0]:>7.1f} /{critical[1]:>4.1f}{r['critical_of_step']:>7.1%}")
            return r

        head = (f"{'':28}{'Loader()':>9}{'1st batch':>10}{'files':>6}{'MB 1st':>8}{'MB +' + str(steps):>8}"
                f"{'B/doc':>7}{'ms/step':>8}{'Mtok/s':>7}{'critical ms':>13}{'% step':>7}")
        for n_docs in sizes:
            t = time.perf_counter()
            d = synthetic_shards(tmp / f"d{n_docs}", n_docs, n_shards, sparse=True)
            results[f"{n_docs}_build_s"] = time.perf_counter() - t
            print(f"\n{n_docs:,} documents: built in {results[f'{n_docs}_build_s']:.1f} s "
                  f"({sum(p.stat().st_size for p in d.glob('*.idx')) / 1e6:,.0f} MB of .idx)\n{head}")
            for stage in STAGES:
                for world in (16, 128):
                    for name, path in designs.items():
                        if name == "baseline" and n_docs > 10_000_000:
                            continue  # 40-60 bytes per document: 4-6 GB, more than this machine can spare
                        r = probe(dir=str(d), stage=stage, world=world, baseline=path, hide=100 if path is None else 0)
                        results[f"{n_docs}_{stage}_{world}_{name}"] = row(stage, world, name, r)
            if n_docs == sizes[-1]:  # the steps above also read the .idx pages for the first time
                print("  the .idx files in the page cache before Loader() (as once a run has read each page once)")
                for stage in STAGES:
                    for world in (16, 128):
                        r = probe(dir=str(d), stage=stage, world=world, baseline=None, hide=100, cached_index=True)
                        results[f"{n_docs}_{stage}_{world}_ours_cached_index"] = row(stage, world, "ours", r)
            if n_docs == 1_000_000:  # the loader's own CPU time: the .bin pages stay in the page cache
                print("  warm: the .bin pages stay in the page cache (the loader's own CPU time)")
                for name, path in designs.items():
                    r = probe(dir=str(d), baseline=path, cold=False)
                    print(f"  stage1 x16   {name:<12}{'':48}{r['step_ms']:>8.1f}{r['tokens_per_s'] / 1e6:>7.1f}")
                    results[f"{n_docs}_stage1_16_{name}_warm"] = r
            shutil.rmtree(d)
        dense = synthetic_shards(tmp / "dense", 200_000, 20)  # 24 MB shards, larger than a read-ahead window
        print(f"\nbytes read from storage, stage 1 x16: 200,000 documents in 20 dense shards, evicted from the page "
              f"cache before Loader() and before each of 5 steps (read-ahead of this disk: {read_ahead()})")
        for name, path in designs.items():
            r = probe(dir=str(dense), baseline=path, steps=5)
            print(f"  {name:<10}{r['read_per_useful_byte']:>8.1f} bytes per byte of document delivered; "
                  f"Loader() and first batch {r['startup_read_mb']:.1f} MB")
            results[f"read_amplification_{name}"] = r
    return results


def data_scale_mixture(args, n_docs=None, corpora=None, n_shards=None, steps=None):
    """bench.py data --scale --mixture K: the loader on a mixture of K corpora (synthetic_shards, sparse, equal
    weights) of n_docs documents in n_shards shards each, against the same documents and shards as one corpus, at
    the stage shapes as rank 0 of 16, with data_scale's columns (loader_probe). Target: Loader() + first batch, open
    files and memory within 2x of one corpus's (startup reads O(shards) either way; nothing is kept per document).
    With --mixture_docs N: corpora of N documents each, against one of them alone (bench.py data --scale's
    measurement of N documents), so that corpora too large to hold twice on the disk can be measured."""
    corpora = corpora or args.mixture
    alone = bool(getattr(args, "mixture_docs", None)) and not n_docs
    n_docs = n_docs or getattr(args, "mixture_docs", None) or (100_000 if args.quick else 25_000_000)
    n_shards, steps = n_shards or 100, steps or (10 if args.quick else 50)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        dirs = [str(synthetic_shards(Path(tmp) / f"c{k}", n_docs, n_shards, sparse=True, seed=k))
                for k in range(corpora)]
        if alone:
            one, baseline = dirs[0], f"one of them alone ({n_docs:,} documents in {n_shards:,} shards)"
        else:
            one = str(synthetic_shards(Path(tmp) / "one", corpora * n_docs, corpora * n_shards, sparse=True))
            baseline = f"one of {corpora * n_docs:,} in {corpora * n_shards:,}"
        print(f"{corpora} corpora of {n_docs:,} documents in {n_shards:,} shards each, and {baseline} (sparse, "
              f"lognormal lengths, mean {SCALE_MEAN_TOKENS}), built in {time.perf_counter() - t:.0f} s; rank 0 of 16, "
              f"by token budget, the shards evicted before Loader(); {steps} steps, the .bin files evicted before each")
        print(f"{'':26}{'Loader()':>9}{'1st batch':>10}{'files':>6}{'MB 1st':>8}{'MB +' + str(steps):>8}"
              f"{'ms/step':>8}{'Mtok/s':>7}")
        for stage in STAGES:
            for name, extra in (("one corpus", {"dir": one}), (f"mixture of {corpora}", {"mixture": dirs})):
                spec = {"cold": True, "hide": 0, "steps": steps, "world": 16, "stage": stage, "baseline": None,
                        **extra}
                run = "import bench, json, sys; bench.loader_probe(json.loads(sys.argv[1]))"
                proc = subprocess.run([sys.executable, "-c", run, json.dumps(spec)], cwd=REPO, capture_output=True,
                                      text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if proc.returncode:
                    raise Problem(f"loader probe {name} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.splitlines()[-1])
                results[f"{stage}_{'one' if 'dir' in extra else 'mixture'}"] = r
                print(f"  {stage} {name:<18}{r['startup_s']:>9.2f}{r['first_batch_s']:>10.2f}{r['open_files']:>6}"
                      f"{r['anonymous_mb_first']:>8.1f}{r['anonymous_mb_steps']:>8.1f}{r['step_ms']:>8.1f}"
                      f"{r['tokens_per_s'] / 1e6:>7.1f}")
    return results


def read_ahead():
    """The read-ahead of the disk holding the temporary directory."""
    device = os.stat(tempfile.gettempdir()).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for path in (block / "queue" / "read_ahead_kb", block / ".." / "queue" / "read_ahead_kb"):  # disk, partition
        if path.is_file():
            return f"{int(path.read_text()):,} KiB"
    return "unknown"


def bench_data(args):
    """prepare: tokens/s with N worker processes against sentencepiece's own single-process encode of the
    same text (target: ratio >= 0.85 x N). Loader: tokens/s of one process making masked batches (target
    >= 5M). Text: the synthetic demo corpus, repeated; tokenizer: --tokenizer (the README's figures: llm-jp's),
    else a demo one.
    With --budget: data_budget above; with --scale: data_scale."""
    if args.budget:
        return data_budget(args)
    if args.scale and args.mixture:
        return data_scale_mixture(args)
    if args.scale:
        return data_scale(args)
    import shutil
    import tempfile
    from pathlib import Path

    import sentencepiece as spm

    import data
    import demo
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = demo.write_demo(tmp / "demo", n_docs=1000 if args.quick else 3000)
        if args.tokenizer and not Path(args.tokenizer).is_file():
            raise Problem(f"bench.py data: --tokenizer {args.tokenizer}: no such file")
        tok = args.tokenizer or data.train_tokenizer(paths["corpus"], 1500, tmp / "tokenizer.model")
        corpus = tmp / "corpus.jsonl"
        corpus.write_text(paths["corpus"].read_text(encoding="utf-8") * (1 if args.quick else 12), encoding="utf-8")
        texts = [record["text"] for _, record in data.read_jsonl(corpus)]
        sp = spm.SentencePieceProcessor(model_file=str(tok))
        n_tokens = sum(map(len, sp.encode(texts, num_threads=1)))
        print(f"prepare: {corpus.stat().st_size / 1e6:.1f} MB, {len(texts):,} docs, {n_tokens:,} tokens, tokenizer {tok.name}")

        def prepare(workers):
            shutil.rmtree(tmp / "shards", ignore_errors=True)  # a fresh directory: nothing to skip
            data.prepare(corpus, tok, tmp / "shards", workers=workers)

        counts = sorted({1, 2, os.cpu_count() or 1})
        fns = {"sentencepiece": lambda: sp.encode(texts, num_threads=1)}
        fns.update({f"prepare x{w}": (lambda w=w: prepare(w)) for w in counts})
        times = compare(fns, warmup=0, iters=1 if args.quick else 3)
        raw = n_tokens / times["sentencepiece"]
        print(f"{'':16}{'tokens/s':>12}{'vs raw':>9}{'target':>9}")
        print(f"{'sentencepiece':16}{raw:>12,.0f}{1:>9.2f}")
        results["sentencepiece_tokens_per_s"] = raw
        for w in counts:
            tps = n_tokens / times[f"prepare x{w}"]
            print(f"{f'prepare x{w}':16}{tps:>12,.0f}{tps / raw:>9.2f}{0.85 * w:>9.2f}")
            results[f"prepare_x{w}"] = {"tokens_per_s": tps, "ratio_vs_raw": tps / raw, "target": 0.85 * w}

        L, micro, steps = 1024, 32, 20 if args.quick else 100
        print(f"loader (one process, masking on, max_seqlen {L}, micro-batch {micro}):")
        for mode in ("line_by_line", "packed"):
            loader = data.Loader(tmp / "shards", batch_size=micro, micro_batch_size=micro, max_seqlen=L, mode=mode)
            it = iter(loader)
            n = [0]

            def pull():
                for mb in next(it):
                    n[0] += len(mb["input_ids"])
            tokens_before, seconds = n[0], timeit(lambda: [pull() for _ in range(steps)], warmup=1, iters=3)
            tps = (n[0] - tokens_before) / 4 / seconds  # timeit ran warmup + 3 timed rounds of `steps` steps
            print(f"  {mode:14}{tps:>14,.0f} tokens/s  (target 5,000,000)")
            results[f"loader_{mode}_tokens_per_s"] = tps
    return results


# ---------------------------------------------------------------------------------------------------------

def main():
    tasks = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    parser = argparse.ArgumentParser(description=__doc__, epilog=textwrap.fill(gpu_usage(), 110),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(tasks))
    parser.add_argument("--out", default=None, help="append results as one JSON line to this file (gpu: the "
                                                    "directory for gpu.jsonl and the part logs, required)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke test")
    parser.add_argument("--mixture", type=int, default=0, help="data --scale: a mixture of this many corpora vs one")
    parser.add_argument("--mixture_docs", type=int, default=0, help="data --scale --mixture: documents per corpus, "
                        "compared with one of the corpora alone (default: 25M each, against the same documents as one)")
    parser.add_argument("--budget", action="store_true", help="data: micro-batches by token budget vs by count")
    parser.add_argument("--scale", action="store_true", help="data: the loader on 1M-100M documents vs the old design")
    parser.add_argument("--tokenizer", help="data: the sentencepiece model to measure with (default: a demo one "
                                            "trained on the spot)")
    parser.add_argument("--flex", action="store_true", help="attention: against compiled FlexAttention instead")
    parser.add_argument("--stream", action="store_true", help="attention, train: also print each figure as a "
                                                              "JSON line the moment it is measured")
    args = parser.parse_args()
    env = environment()
    print(f"# {args.task} on {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")
    try:
        results = tasks[args.task](args)
    except Problem as e:  # one line, named by the command (bench.py TASK: ...), and exit status 1
        sys.exit(str(e))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"task": args.task, **env, "results": results}) + "\n")


if __name__ == "__main__":
    main()
