"""bench.py on the CPU: the GPU runner keeps every figure a part killed at its time limit measured; the training
benchmark deals micro-batches as train.py does; compare() takes medians; data --budget's per-micro-step figures."""
import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data

ROOT = Path(__file__).resolve().parents[1]

# a fake part: starts a process of its own (as torch.compile's workers are), prints a figure and a pytest
# outcome without flushing (the runner must make it unbuffered), waits until the runner has appended the
# figure to gpu.jsonl, says so in a second figure, then runs far past its limit
SLOW_PART = r"""
import json, os, subprocess, sys, time
sub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("@figure " + json.dumps({"step": 1, "grandchild": sub.pid}))
print("tests/test_fake.py::test_one PASSED")
jsonl = os.path.join(sys.argv[1], "gpu.jsonl")
while not (os.path.exists(jsonl) and '"step": 1' in open(jsonl).read()):
    time.sleep(0.05)
print("@figure " + json.dumps({"step": 2}))
time.sleep(600)
"""
LIMIT = 15  # seconds; the fake part needs well under one to reach step 2


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in "ZX"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_gpu_runner_keeps_the_figures_of_a_part_killed_at_its_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the runner must set it for its commands
    env = {"device": "fake", "commit": "abc"}
    parts = [("slow part", LIMIT, [[sys.executable, "-c", SLOW_PART, str(tmp_path)]]),
             ("next", 60, [[sys.executable, "-c", "print('@figure {\"step\": 3}')"],
                           [sys.executable, "-c", "import sys; sys.exit(3)"]])]
    t0 = time.monotonic()
    figures, status = bench.run_parts(parts, str(tmp_path), env)
    assert time.monotonic() - t0 < LIMIT + 60  # the kill took the grandchild too, so its pipe closed
    lines = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert lines == [{**env, **f} for f in figures]  # every line whole, with the environment
    slow = [f for f in figures if f["part"] == "slow part"]
    assert [f.get("step") for f in slow[:3] if "step" in f] == [1, 2]  # step 2: step 1 was written as it came
    assert {"part": "slow part", "test": "tests/test_fake.py::test_one", "outcome": "passed"} in slow
    assert slow[-1]["status"] == status["slow part"][0] == f"timeout after {LIMIT} s"
    assert not alive(slow[0]["grandchild"])
    # the next part still ran, with its whole time; a failing command fails the part
    assert {"part": "next", "step": 3} in figures and status["next"][0] == "exit 3"
    log = (tmp_path / "gpu_slow_part.log").read_text()
    assert '@figure {"step": 2}' in log and "tests/test_fake.py::test_one PASSED" in log
    assert "[1]" not in log and "[0] @figure" in (tmp_path / "gpu_next.log").read_text()


def run_bench(*argv):
    return subprocess.run([sys.executable, "bench.py", *argv], cwd=ROOT, capture_output=True, text=True)


def test_gpu_help_says_where_results_go_and_the_budget(tmp_path):
    run = run_bench("gpu", "--out", str(tmp_path / "results"), "--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    budget = sum(seconds for _, seconds in bench.GPU_PARTS)
    assert "DIR/gpu.jsonl" in text and "DIR/gpu_<part>.log" in text and f"Time budget {budget} s" in text
    assert all(f"{part} {seconds} s" in text for part, seconds in bench.GPU_PARTS)
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_without_cuda_or_out_dir_fails_in_one_line(tmp_path):
    for argv, message in ((["gpu"], "bench.py gpu: --out DIR is required"),
                          (["gpu", "--out", str(tmp_path / "results")], "bench.py gpu: needs a CUDA GPU")):
        run = run_bench(*argv)
        assert run.returncode == 1 and run.stderr.startswith(message) and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "results").exists()


def test_train_benchmark_deals_micro_batches_as_the_stage_configs_train():
    # full sequences on the paper's 16 GPUs, worked out by hand: stage 1 packs 26 x 1,024 tokens per
    # micro-batch, 3,328 / 26 / 16 = 8 each; stage 2 2 x 8,192, 384 / 2 / 16 = 12 each
    g = torch.Generator().manual_seed(0)
    for stage, per_micro, micro_steps in (("stage1", 26, 8), ("stage2", 2, 12)):
        cfg = bench.stage_config(stage)
        assert cfg["micro_batch_tokens"] == per_micro * cfg["max_seqlen"]
        full = bench.train_micro_batches(cfg, "full", g)
        assert full == [[cfg["max_seqlen"]] * per_micro] * micro_steps
        documents = bench.train_micro_batches(cfg, "documents", g)
        assert all(sum(m) <= cfg["micro_batch_tokens"] for m in documents)
        assert len({n for m in documents for n in m}) > 10  # lengths vary
        by_count = bench.train_micro_batches({**cfg, "micro_batch_tokens": 0}, "full", g)
        per_rank = cfg["batch_size"] // 16
        assert by_count == [[cfg["max_seqlen"]] * cfg["micro_batch_size"]] * (per_rank // cfg["micro_batch_size"])
    # on more GPUs than full micro-batches fill: stage 2's 192 of them on 128 (or 100) ranks, every rank runs 2
    # micro-steps as train.py makes it, and rank 0's second is empty (dealt largest first, 0..W-1 then back), a
    # lone <CLS> <SEP> it still computes
    stage2 = bench.stage_config("stage2")
    for world in (128, 100):
        assert bench.train_micro_batches(stage2, "full", g, world=world) == [[8192, 8192], [2]], world


def test_compare_returns_each_functions_median_time(monkeypatch):
    """On a fake clock that each call advances by a set number of seconds (integers, so every difference is
    exact): the median of each function's timed calls, the warmup call left out."""
    clock = [0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def timed(seconds):
        it = iter(seconds)

        def fn():
            clock[0] += next(it)
        return fn
    a, b = [100, 5, 1, 3, 9, 2], [100, 7, 8, 4, 6, 30]
    assert bench.compare({"a": timed(a), "b": timed(b)}, warmup=1, iters=5) == \
        {"a": statistics.median(a[1:]), "b": statistics.median(b[1:])} == {"a": 3, "b": 7}
    assert bench.timeit(timed([100, 40, 10, 20, 50, 30]), warmup=1, iters=5) == 30


def test_data_budget_tokens_per_micro_step_and_fill(monkeypatch):
    """Tokens per micro-step = the global batches' tokens (recorded as they are planned) / the micro-steps of
    all 16 ranks, so tokens per micro-step x 16 x micro-steps gives the tokens back; fill = tokens per
    micro-step / the micro-batch token budget, at most 1 (no micro-step holds more than its budget)."""
    planned, pack = [], data.pack_by_tokens

    def pack_by_tokens(lengths, budget, world):
        plan = pack(lengths, budget, world)
        planned.append((int(np.sum(lengths)), len(plan[0])))
        return plan
    monkeypatch.setattr(data, "pack_by_tokens", pack_by_tokens)
    results = bench.data_budget(argparse.Namespace(quick=True))
    assert len(planned) % len(results) == 0
    n_batches = len(planned) // len(results)
    for i, (name, r) in enumerate(results.items()):  # in the order they were planned
        batches = planned[i * n_batches:(i + 1) * n_batches]
        tokens, world, budget = sum(t for t, _ in batches), r["world"], r["micro_batch_tokens"]
        assert world == 16 and budget == r["micro_batch_size"] * r["max_seqlen"]
        steps = {"budget": sum(s for _, s in batches),
                 "count": n_batches * (r["batch_size"] // (world * r["micro_batch_size"]))}
        for how in ("count", "budget"):
            e = r[how]
            assert e["micro_steps"] * n_batches == pytest.approx(steps[how]), (name, how)
            assert e["tokens_per_micro_step"] * world * steps[how] == pytest.approx(tokens, rel=1e-12), (name, how)
            assert e["fill"] == pytest.approx(e["tokens_per_micro_step"] / budget, rel=1e-12)
            assert 0 < e["fill"] <= 1 and e["tokens_per_micro_step"] <= e["peak_tokens"] <= budget, (name, how)


def test_data_scale_a_mixture_costs_what_one_corpus_of_the_same_documents_does():
    """bench.py data --scale --mixture at test scale: a mixture of 4 corpora against the same documents and shards as
    one corpus, in processes of their own. Open files: the same; Loader() + first batch and anonymous memory within
    2x (plus 50 ms and 1 MB: a timer's and the allocator's grain on a shared machine), each figure the least of two
    runs of both, as other jobs on the machine can stall one process. Every step delivered tokens."""
    runs = [bench.data_scale_mixture(argparse.Namespace(quick=True, mixture=4), n_docs=50_000, n_shards=10, steps=5)
            for _ in range(2)]
    for stage in bench.STAGES:
        one, mix = ({key: min(r[f"{stage}_{which}"][key] for r in runs) for key in runs[0][f"{stage}_{which}"]}
                    for which in ("one", "mixture"))
        assert mix["open_files"] == one["open_files"]
        assert mix["startup_s"] + mix["first_batch_s"] <= 2 * (one["startup_s"] + one["first_batch_s"]) + 0.05
        for key in ("anonymous_mb_first", "anonymous_mb_steps"):
            assert mix[key] <= 2 * max(one[key], 0) + 1, (stage, key, mix[key], one[key])
        assert mix["tokens_per_step"] > 0 and one["tokens_per_step"] > 0
