"""train.py end to end on a very small model: gradients on 1, 2 and 3 processes against plain PyTorch, 1 vs 2
processes and resumes across process counts, exact resume after SIGKILL, damaged checkpoints, bf16 compute,
NaN detection, export, config checking and the command line; two nodes simulated by two torchrun launchers
(a killed, a stuck and a misconfigured node); micro-batch planning for 128 processes; checkpoints that would
run code refused wherever they are read, a full disk, and a job that succeeded ending with status 0.

Run as a script under torchrun, this file is the worker of the gradient, retrieval, checkpoint-choice,
checkpoint-loading and leaving tests, and runs train.py on a simulated small filesystem."""
import contextlib
import errno
import itertools
import json
import math
import operator
import os
import pickle
import pickletools
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import fields
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoint  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
from conftest import write_jsonl  # noqa: E402
import ranks  # noqa: E402
import train  # noqa: E402
from evaluate import read_miracl_pairs, retrieval_scores  # noqa: E402
from model import ModernBERT, ModernBertConfig, parallelize  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # deterministic and fast on a shared CPU
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMPARED = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss", "val_acc", "recall@10", "mrr@10")
STEPS = 12


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A tiny model on a small demo corpus; returns the config file's path."""
    root = tmp_path_factory.mktemp("train")
    paths = demo.write_demo(root / "demo", n_docs=300)
    data.train_tokenizer(paths["corpus"], 1200, root / "tok.model")
    data.prepare(paths["corpus"], root / "tok.model", root / "shards", val_fraction=0.1)
    with open(paths["miracl"]) as f, open(root / "miracl.jsonl", "w") as g:
        g.writelines(f.readlines()[:30])
    path = root / "tiny.py"
    path.write_text(f"""\
out_dir = "{root / 'out'}"
data_dir = "{root / 'shards'}"
tokenizer = "{root / 'tok.model'}"
model = "tiny"
model_args = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
max_seqlen = 48
batch_size = 8
micro_batch_size = 2
max_steps = {STEPS}
log_every = 5  # and the first and last step
checkpoint_every = 3
keep_last = 3
eval_every = 4
eval_batches = 100  # the whole val split: its last batch is short, uneven across 2 ranks
retrieval_eval = "{root / 'miracl.jsonl'}"
retrieval_max_len = 64
lr = 3e-3
warmup_steps = 2
""")
    return path


def run(cmd, out_dir, *args, check=True):
    proc = subprocess.run([*cmd, "train.py", *map(str, args), f"--out_dir={out_dir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out_dir):
    return [{k: v for k, v in json.loads(line).items() if k in COMPARED}
            for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got, expected, rel):
    """Same lines; loss, grad norm and evaluations within rel of each other."""
    assert [(m["step"], sorted(m), m.get("tokens")) for m in got] == [(m["step"], sorted(m), m.get("tokens")) for m in expected]
    for a, b in zip(got, expected):
        for key in ("loss", "grad_norm", "val_loss", "val_acc", "recall@10", "mrr@10"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=0), (a["step"], key, a[key], b[key])


def process_tree(pid):
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def run_and_kill(cmd, out_dir, config, until):
    """Start a run, SIGKILL all its processes once until(out_dir) holds; the metrics lines it wrote."""
    proc = subprocess.Popen([*cmd, "train.py", str(config), f"--out_dir={out_dir}"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not until(Path(out_dir)):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.005)
    finally:
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    time.sleep(0.5)  # let the killed workers' exits land
    assert not [p for p in process_tree(proc.pid) if p != proc.pid], "a process of the killed run survived"
    return metrics(out_dir)


def logged_step(at):
    def until(out):
        try:
            return any(m.get("step", 0) >= at and "loss" in m for m in metrics(out))
        except (OSError, json.JSONDecodeError):
            return False
    return until


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref1") / "out"
    run([sys.executable], out, config)
    return out


@pytest.fixture(scope="module")
def reference2(config, tmp_path_factory):
    """The same run on two processes."""
    out = tmp_path_factory.mktemp("ref2") / "out"
    run(TORCHRUN, out, config)
    return out


def rewind(run_dir, out, step):
    """A copy of a finished run as it was when checkpoint `step` was its newest (metrics.jsonl untrimmed)."""
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "hf")
    for ckpt in checkpoint.list_checkpoints(out):
        if checkpoint.step_of(ckpt) > step:
            shutil.rmtree(ckpt)
    return out


# ---- leaving after the last collective -----------------------------------------------------------------------


def late_release_worker():
    """Under torchrun: all-reduces whose tensors gloo's threads can release only after this process has gone on (it
    keeps the interpreter lock meanwhile), with a DTensor alive as FSDP's parameters are; then ranks.end(). -> the
    DTensor and its mesh, which the caller keeps (freeing them would give those threads the lock)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = DTensor.from_local(torch.ones(4), mesh, [Shard(0)], run_check=False)
    dist.barrier()
    sys.setswitchinterval(100)  # this thread keeps the interpreter lock until it blocks
    tensors = [torch.ones(1000) for _ in range(4)]
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    del works, tensors
    sum(range(30_000_000))  # the all-reduces finish meanwhile; releasing their tensors waits for the lock
    ranks.end()
    return sharded, mesh


def test_a_job_that_succeeded_leaves_with_status_0_while_gloo_still_holds_its_tensors():
    """With a DTensor alive, destroy_process_group leaves gloo's threads running, and an interpreter teardown that
    overlaps their release of a finished collective's tensors aborts the process (SIGABRT): ranks.end() leaves
    without a teardown, and flushes what was printed."""
    proc = subprocess.run([*TORCHRUN, __file__, "late_release"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", "import ranks; print('unflushed', end=''); ranks.end()"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, "unflushed"), proc.stderr


# ---- one computation on any number of processes -----------------------------------------------------------


def gradient_batch():
    """Six packed sequences of different lengths, a third of their tokens labelled; the same on every process."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 17, 9, 30, 12, 21]
    ids = [torch.randint(8, 64, (n,), generator=g) for n in lengths]
    labels = [torch.where(torch.rand(n, generator=g) < 0.35, x, -100) for x, n in zip(ids, lengths)]
    return ids, labels


def gradient_model():
    torch.manual_seed(0)
    return ModernBERT(ModernBertConfig.preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=3, num_attention_heads=2, local_attention=8))


def packed(ids, labels):
    cu = torch.tensor([0] + [len(x) for x in ids]).cumsum(0).to(torch.int32)
    return torch.cat(ids), torch.cat(labels), cu, max(len(x) for x in ids)


def gradient_worker(out):
    """Under torchrun: this process's share of gradient_batch() through parallelize(), weighted as train.py does
    (its masked tokens over the global batch's); rank 0 saves the full gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = parallelize(gradient_model(), init_device_mesh("cpu", (world,)))
    ids, labels = gradient_batch()
    per = len(ids) // world
    ids, labels = ids[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]
    total = sum(int((x != -100).sum()) for x in gradient_batch()[1])
    x, y, cu, m = packed(ids, labels)
    _, loss = model(x, labels=y, cu_seqlens=cu, max_seqlen=m)
    (loss * int((y != -100).sum()) / total).backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()
    ranks.end()


def test_gradients_on_1_2_3_processes_equal_plain_pytorch(tmp_path):
    model = gradient_model()  # the reference: no process group, the whole batch in one forward
    x, y, cu, m = packed(*gradient_batch())
    model(x, labels=y, cu_seqlens=cu, max_seqlen=m)[1].backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    for world in (1, 2, 3):
        out = tmp_path / f"grads{world}.pt"
        proc = subprocess.run([*TORCHRUN[:-1], f"--nproc_per_node={world}", __file__, str(out)], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = torch.load(out)
        assert got.keys() == expected.keys()
        for name, g in expected.items():
            err = ((got[name] - g).norm() / g.norm()).item()
            assert err <= 1e-6, (world, name, err)


RECIPE = ["--mlm_probability=0.15", "--grad_clip=0.5", "--weight_decay=0.1", "--lr=3e-3", "--warmup_steps=2",
          "--max_steps=5", "--log_every=1", "--eval_every=5", "--eval_batches=2", "--checkpoint_every=100",
          "--retrieval_eval=", "--seed=3"]


def test_first_steps_are_a_plain_pytorch_loop(config, tmp_path):
    """train.py's first steps written out here without it: the config's masking rate in the loaders, the loss as
    the mean over the global batch's masked tokens, clipping of the global gradient norm, AdamW with weight decay on
    the linear layers' weight matrices only, the learning rate warmed up then decayed, the tokens of each step, and
    the validation loss and accuracy over the first eval_batches batches of the val split before and after; each
    setting taken from the command line (none at its default)."""
    out = tmp_path / "out"
    run([sys.executable], out, config, *RECIPE)
    got = [m for m in metrics(out) if "loss" in m]
    evals = [m for m in metrics(out) if "val_loss" in m]
    cfg, _ = train.load_config([str(config), *RECIPE])
    tok = data.Tokenizer(cfg.tokenizer)
    ids = dict(pad_token_id=tok.pad_id, cls_token_id=tok.cls_id, sep_token_id=tok.sep_id, mask_token_id=tok.mask_id)
    torch.manual_seed(cfg.seed)
    model = ModernBERT(ModernBertConfig.preset("tiny", vocab_size=tok.vocab_size, **cfg.model_args, **ids))
    embedding = model.model.embeddings.tok_embeddings.weight
    decay = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not embedding]
    rest = [p for p in model.parameters() if all(p is not d for d in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  betas=(0.9, 0.98), eps=1e-6)
    loader, val = (data.Loader(cfg.data_dir, split=split, batch_size=cfg.batch_size,
                               micro_batch_size=cfg.micro_batch_size, max_seqlen=cfg.max_seqlen, seed=cfg.seed,
                               mlm_probability=0.15, shuffle=split == "train", tokenizer=tok)
                   for split in ("train", "val"))
    start = val.state_dict()
    assert val.samples_per_epoch > 2 * cfg.batch_size  # the val split holds more than eval_batches batches

    def masked_loss(micro_batches):
        """Cross-entropy summed over the masked tokens of a global batch, correct predictions, masked tokens."""
        loss, correct, n = 0.0, 0, 0
        for mb in micro_batches:
            labels = mb["labels"]
            logits = model(mb["input_ids"], cu_seqlens=mb["cu_seqlens"], max_seqlen=mb["max_seqlen"])[0]
            logits, target = logits[labels != -100], labels[labels != -100]
            loss = loss + F.cross_entropy(logits, target, reduction="sum")
            correct += int((logits.argmax(-1) == target).sum())
            n += len(target)
        return loss, correct, n

    def validation(step, expected):
        with torch.no_grad():
            sums = [masked_loss(micro_batches) for _, micro_batches in zip(range(2), val)]
        loss, correct, n = (sum(float(s[k]) for s in sums) for k in range(3))
        assert (expected["step"], expected["val_loss"], expected["val_acc"]) == (
            step, pytest.approx(loss / n, rel=1e-5), pytest.approx(correct / n, abs=1e-9))
        val.load_state_dict(start)

    validation(0, evals[0])
    clipped = 0
    for step, micro_batches in zip(range(5), loader):
        lr = 3e-3 * (step + 1) / 2 if step < 2 else 3e-3 * (5 - step) / 3
        loss, _, masked = masked_loss(micro_batches)
        (loss / masked).backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        clipped += norm > 0.5
        for p in model.parameters():
            p.grad *= min(1.0, 0.5 / (norm + 1e-6))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        m = got[step]
        tokens = sum(int(mb["cu_seqlens"][-1]) for mb in micro_batches)
        assert (m["step"], m["tokens"], m["lr"]) == (step + 1, tokens, pytest.approx(lr, rel=1e-12)), m
        assert (m["loss"], m["grad_norm"]) == (pytest.approx(loss.item() / masked, rel=1e-5),
                                               pytest.approx(norm, rel=1e-5)), m
    assert len(got) == 5 and clipped >= 4  # the clipping makes a difference to this curve
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.1 < m["peak_mem"] < total_memory for m in lines if "loss" in m)  # GiB; torch alone takes more
    validation(5, evals[1])
    assert len(evals) == 2


def test_two_processes_match_one(reference, reference2):
    one = metrics(reference)
    assert [m["step"] for m in one if "loss" in m] == [1, 5, 10, STEPS]  # the last step is logged too
    assert [m["step"] for m in one if "val_loss" in m] == [0, 4, 8, STEPS]
    assert_same_curve(metrics(reference2), one, rel=1e-5)


def test_the_log_prints_what_metrics_jsonl_records_and_the_parameter_count(reference):
    """log.txt's progress lines, read by people, carry metrics.jsonl's numbers for the same steps (loss, learning
    rate, grad norm, tokens, evaluations); the parameter count is the final model's, counted from its tensors."""
    log = (reference / "log.txt").read_text().splitlines()
    lines = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    printed = [line for line in log if re.match(r"step \d+/", line)]
    assert [int(re.match(r"step (\d+)/", line).group(1)) for line in printed] == [m["step"] for m in lines if "loss" in m]
    for line, m in zip(printed, [m for m in lines if "loss" in m]):
        assert line.startswith(f"step {m['step']}/{STEPS} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad norm "
                               f"{m['grad_norm']:.3f} | {m['tokens']} tokens, {m['tokens_per_s']:,.0f} tokens/s"), line
    evaluations = [line for line in log if re.match(r"step \d+: val_loss", line)]
    assert evaluations == [f"step {m['step']}: " + ", ".join(f"{k} {m[k]:.4f}" for k in m if k != "step")
                           for m in lines if "val_loss" in m]
    state = ModernBERT.from_pretrained(reference / "hf").state_dict()
    total = sum({t.data_ptr(): t.numel() for t in state.values()}.values())  # the tied decoder weight once
    embedding = state["model.embeddings.tok_embeddings.weight"].numel()
    assert f"parameters: {total:,} ({total - embedding:,} without the embedding)" in log


def retrieval_worker(config, model_dir, out, *pair_files):
    """Under torchrun: train.py's retrieval evaluation of a model on each pairs file, its texts shared over the
    ranks; rank 0 saves the scores."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, _ = train.load_config([config])
    model = parallelize(ModernBERT.from_pretrained(model_dir), init_device_mesh("cpu", (world,))).eval()
    scores = []
    for path in pair_files:
        run = train.Run(cfg, config, rank, world, torch.device("cpu"), None, Path(out).parent,
                        tokenizer=data.Tokenizer(cfg.tokenizer), pairs=read_miracl_pairs(path))
        scores.append(train.evaluate_retrieval(run, model, 0))
    if rank == 0:
        Path(out).write_text(json.dumps(scores))
    dist.barrier()
    ranks.end()


def long_passages(config, out):
    """The config's retrieval pairs with every passage behind one long shared prefix (more than its
    retrieval_max_len of 64 tokens): cut at 64 tokens, all passages are alike."""
    pairs = read_miracl_pairs(config.parent / "miracl.jsonl")
    tok, prefix = data.Tokenizer(config.parent / "tok.model"), ""
    for _, passage in pairs:
        if len(tok.encode(prefix)) > 80:
            break
        prefix += passage
    with open(out, "w") as f:
        for i, (query, passage) in enumerate(pairs):
            f.write(json.dumps({"query_id": str(i), "query": "", "positive_passages": [
                {"docid": f"{i}#0", "title": "", "text": query},
                {"docid": f"{i}#1", "title": "", "text": prefix + passage}]}, ensure_ascii=False) + "\n")
    return out


def test_retrieval_shared_over_ranks_equals_evaluate_py(config, reference2, tmp_path):
    """Recall@10 / MRR@10 with the texts shared over 2 ranks (the run's last evaluation) and over 3 (14 batches:
    the third rank fills up with an empty one) are evaluate.py's on the final model, at the config's
    retrieval_max_len (passages that differ only beyond it score alike)."""
    root = config.parent
    model, tok = ModernBERT.from_pretrained(reference2 / "hf"), data.Tokenizer(root / "tok.model")
    files = [root / "miracl.jsonl", long_passages(config, tmp_path / "long.jsonl")]
    expected = [retrieval_scores(model, tok, f, max_len=64) for f in files]
    assert expected[0]["n_queries"] == 30
    uncut = retrieval_scores(model, tok, files[1], max_len=8192)
    assert (uncut["recall@10"], uncut["mrr@10"]) != (expected[1]["recall@10"], expected[1]["mrr@10"])
    proc = subprocess.run([*TORCHRUN[:-1], "--nproc_per_node=3", __file__, "retrieval", str(config),
                           str(reference2 / "hf"), str(tmp_path / "scores.json"), *map(str, files)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = metrics(reference2)[-1]
    assert final["step"] == STEPS
    shared = json.loads((tmp_path / "scores.json").read_text())
    for got, want in ((final, expected[0]), (shared[0], expected[0]), (shared[1], expected[1])):
        assert (got["recall@10"], got["mrr@10"]) == pytest.approx((want["recall@10"], want["mrr@10"]), rel=1e-9)


@pytest.mark.parametrize("cmd", [TORCHRUN, [sys.executable]], ids=["1to2", "2to1"])
def test_resume_on_another_number_of_processes(config, reference, reference2, cmd, tmp_path):
    written_by = reference if cmd is TORCHRUN else reference2
    out = rewind(written_by, tmp_path / "out", step=6)
    proc = run(cmd, out, config)
    assert f"resuming from {out / 'ckpt_6'} at step 6" in proc.stdout
    assert ("written by 1 processes, now 2" if cmd is TORCHRUN else "written by 2 processes, now 1") in proc.stdout
    assert_same_curve(metrics(out), metrics(reference), rel=1e-5)


def test_bfloat16_compute_trains_close_to_float32(config, reference, tmp_path):
    """FSDP2 mixed precision as on a GPU: bf16 weights in forward/backward, fp32 master weights and reduction."""
    out = tmp_path / "out"
    proc = run([sys.executable], out, config, "--dtype=bfloat16", "--eval_every=0", "--checkpoint_every=100")
    assert "torch.bfloat16 compute" in proc.stdout
    fp32 = {m["step"]: m["loss"] for m in metrics(reference) if "loss" in m}
    bf16 = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    assert bf16.keys() == fp32.keys()
    # measured: at most 6.4e-5 relative apart over these 12 steps (2.9e-6 at step 1), while the loss falls by 6%
    assert bf16 != fp32  # bf16 did run
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=1e-3), step
    assert bf16[STEPS] < bf16[1] - 0.2


# ---- checkpoints ------------------------------------------------------------------------------------------


def check_resume(cmd, config, reference, out, until):
    """Kill a run, plant what a kill while saving leaves (a .tmp directory with a truncated shard and no
    meta.json) and a half-written metrics line; rerunning reproduces the uninterrupted run exactly."""
    expected = metrics(reference)
    killed = run_and_kill(cmd, out, config, until)
    assert killed == expected[:len(killed)]
    complete = checkpoint.list_checkpoints(out)
    step = checkpoint.step_of(complete[-1]) if complete else 0
    partial = out / f"ckpt_{step + 1}.tmp"
    if complete:
        shutil.copytree(complete[-1], partial)
        (partial / "meta.json").unlink()
        shard = next(partial.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        partial.mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')
    proc = run(cmd, out, config)
    assert (f"resuming from {complete[-1]} at step {step}" in proc.stdout) if complete else "resuming" not in proc.stdout
    assert not partial.exists()
    assert metrics(out) == expected  # every step, bit for bit, and nothing twice
    return proc


def test_resume_after_kill_one_process(config, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # what a run killed before its first checkpoint leaves: a new run starts metrics.jsonl over
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    check_resume([sys.executable], config, reference, out, logged_step(5))
    log = (out / "log.txt").read_text()
    assert log.startswith("# ") and "# commit " in log and f"max_steps = {STEPS}" in log and "torch " in log
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_12", "ckpt_6", "ckpt_9"]  # keep_last = 3


def saving(step):
    """True while checkpoint `step` is being written (its .tmp directory exists)."""
    return lambda out: (out / f"ckpt_{step}.tmp").exists()


def test_resume_after_kill_while_saving_two_processes(config, reference2, tmp_path):
    check_resume(TORCHRUN, config, reference2, tmp_path / "out", saving(6))


def flip(file):
    """One bit flipped in the middle of a file: same size, other content."""
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    file.write_bytes(bytes(raw))


def damage(ckpt, how):
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
        return f"{shard}: {shard.stat().st_size} bytes, meta.json records {shard.stat().st_size + 10}"
    if how == "flipped":
        flip(shard)
        return f"{shard}: CRC-32 "
    if how == "missing file":
        (ckpt / "rank0.pt").unlink()
        return f"{ckpt / 'rank0.pt'}: missing"
    meta = ckpt / "meta.json"
    if how == "no meta.json":
        meta.unlink()
        return f"{ckpt}: no meta.json"
    if how == "empty meta.json":
        meta.write_text("")
        return f"{meta}: empty"
    if how == "invalid meta.json":
        meta.write_text(meta.read_text()[:-20])
        return f"{meta}:"
    raise ValueError(how)


DAMAGE = ("truncated", "flipped", "missing file", "no meta.json", "empty meta.json", "invalid meta.json")


def test_every_damage_is_counted_and_a_meta_json_lacking_a_key_is_named(reference, tmp_path):
    ckpt = tmp_path / "ckpt_9"
    shutil.copytree(reference / "ckpt_9", ckpt)
    damage(ckpt, "truncated")
    (ckpt / "rank0.pt").unlink()
    with pytest.raises(ranks.Problem, match=r"\(and 1 more problems\)$"):
        checkpoint.verify(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    for key in ("step", "world_size", "config", "model_config", "files"):  # what resuming and loading read
        (ckpt / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(ranks.Problem) as e:
            checkpoint.verify(ckpt)
        assert str(e.value) == f"{ckpt / 'meta.json'}: lacks {key}"


@pytest.mark.parametrize("how", DAMAGE)
def test_damage_is_found_and_named(reference, tmp_path, how):
    ckpt = tmp_path / "ckpt_9"
    shutil.copytree(reference / "ckpt_9", ckpt)
    assert checkpoint.verify(ckpt)["step"] == 9
    expected = damage(ckpt, how)
    with pytest.raises(ranks.Problem) as e:
        checkpoint.verify(ckpt)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_damaged_newest_checkpoint_is_skipped_and_the_curve_continues(config, reference, tmp_path):
    out = rewind(reference, tmp_path / "out", step=9)
    damage(out / "ckpt_9", "flipped")
    (out / "ckpt_12").mkdir()  # a checkpoint directory left without its files
    proc = run([sys.executable], out, config, "--keep_last=4")  # a setting that leaves the curve as it was
    changed = {"out_dir": (str(reference), str(out)), "keep_last": (3, 4)}  # the copy is elsewhere
    assert f"resuming from {out / 'ckpt_6'} at step 6; config changed since: {changed}\n" in proc.stdout
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skipped) == 2 and "ckpt_12: no meta.json" in skipped[0] and "ckpt_9" in skipped[1] \
        and "(altered)" in skipped[1], skipped
    assert f"resuming from {out / 'ckpt_6'} at step 6" in proc.stdout
    assert metrics(out) == metrics(reference)
    assert [checkpoint.verify(c)["step"] for c in checkpoint.list_checkpoints(out)] == [6, 9, 12]  # rewritten


def test_the_newest_good_checkpoint_is_chosen(reference, tmp_path):
    """Three good checkpoints behind a damaged newest one (and an unfinished one): the newest good one."""
    for step in (6, 9, 12):
        shutil.copytree(reference / f"ckpt_{step}", tmp_path / f"ckpt_{step}")
    shutil.copytree(reference / "ckpt_12", tmp_path / "ckpt_15")
    damage(tmp_path / "ckpt_15", "truncated")
    shutil.copytree(reference / "ckpt_12", tmp_path / "ckpt_18.tmp")
    reported = []
    ckpt, meta = checkpoint.latest(tmp_path, report=reported.append)
    assert (ckpt, meta["step"]) == (tmp_path / "ckpt_12", 12)
    assert len(reported) == 1 and reported[0].startswith(f"skipping checkpoint {tmp_path / 'ckpt_15'}")
    assert checkpoint.latest(tmp_path / "none") == (None, None)


def latest_worker(out, *run_dirs):
    """Under torchrun: the checkpoint each run directory would resume from, as train.py chooses it on this rank (the
    check of the files shared over the ranks), and what was reported meanwhile; saved per rank."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    chosen = {}
    for run_dir in run_dirs:
        reports = []
        path, _ = checkpoint.latest(run_dir, report=reports.append)
        chosen[run_dir] = [str(path), reports]
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(chosen))
    ranks.end()


def test_a_file_damaged_in_any_rank_s_share_is_loaded_by_no_rank(reference2, tmp_path):
    """The newest checkpoint of a two-process run with one of its files altered, each file in turn, chosen on 2
    and on 3 processes (each file is then checked by another rank): every rank reports it and resumes from the
    checkpoint before, none loads the damaged one."""
    names = sorted(json.loads((reference2 / f"ckpt_{STEPS}" / "meta.json").read_text())["files"])
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt"]
    runs = {}
    for name in names:
        out = tmp_path / f"damaged{len(runs)}"
        for step in (9, STEPS):
            shutil.copytree(reference2 / f"ckpt_{step}", out / f"ckpt_{step}")
        flip(out / f"ckpt_{STEPS}" / name)
        runs[str(out)] = out / f"ckpt_{STEPS}" / name
    for world in (2, 3):
        chosen = tmp_path / f"chosen{world}"
        chosen.mkdir()
        proc = subprocess.run([*TORCHRUN[:-1], f"--nproc_per_node={world}", __file__, "latest", str(chosen), *runs],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in range(world):
            got = json.loads((chosen / f"rank{rank}.json").read_text())
            for out, file in runs.items():
                path, reports = got[out]
                assert path == str(Path(out) / "ckpt_9"), (world, rank, file.name, path)
                assert len(reports) == 1 and reports[0].startswith(f"skipping checkpoint {file}: CRC-32 ") \
                    and reports[0].endswith("(altered)"), (world, rank, reports)


def test_changed_model_stops_with_the_differing_keys(config, reference, tmp_path):
    out = rewind(reference, tmp_path / "out", step=9)
    proc = run([sys.executable], out, config, "--model_args={'hidden_size': 32, 'intermediate_size': 64, "
               "'num_hidden_layers': 3, 'num_attention_heads': 2}", f"--warmup_steps={STEPS}", check=False)
    assert proc.returncode == 1
    assert f"warning: warmup_steps {STEPS} >= max_steps {STEPS}" in proc.stdout
    assert proc.stderr == (f"error: {out / 'ckpt_9'}: the model differs from this run's: intermediate_size 48 in "
                           f"the checkpoint, 64 now, num_hidden_layers 2 in the checkpoint, 3 now\n")


def test_init_from_loads_the_weights_or_names_the_differing_keys(config, reference, tmp_path):
    out = tmp_path / "out"
    run([sys.executable], out, config, f"--init_from={reference / 'hf'}", "--lr=0.0", "--max_steps=1",
        "--eval_every=0")
    a, b = ModernBERT.from_pretrained(reference / "hf").state_dict(), ModernBERT.from_pretrained(out / "hf").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the weights it started from
    proc = run([sys.executable], tmp_path / "other", config, f"--init_from={reference / 'ckpt_12'}",
               "--model_args={'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2, "
               "'num_attention_heads': 2}", check=False)
    assert proc.returncode == 1 and proc.stderr == (f"error: init_from {reference / 'ckpt_12'}: the model differs "
                                                    f"from this run's: intermediate_size 48 there, 64 here\n")


def test_init_from_with_another_global_rope_theta_loads_the_weights_and_trains(config, reference, tmp_path):
    """Context extension as ModernBERT did it: the weights of a run, the global layers' RoPE theta raised."""
    tiny = "{'hidden_size': 32, 'intermediate_size': 48, 'num_hidden_layers': 2, 'num_attention_heads': 2"
    once = ["--lr=0.0", "--max_steps=1", "--eval_every=0", "--retrieval_eval=", f"--init_from={reference / 'ckpt_12'}"]
    same, raised = tmp_path / "same", tmp_path / "raised"
    run([sys.executable], same, config, *once)
    proc = run([sys.executable], raised, config, *once, f"--model_args={tiny}, 'global_rope_theta': 160000.0}}")
    assert (f"initialising weights from {reference / 'ckpt_12'} (global_rope_theta 10000.0 there, 160000.0 here)"
            in proc.stdout)
    source = ModernBERT.from_pretrained(reference / "hf").state_dict()
    got = ModernBERT.from_pretrained(raised / "hf")
    assert got.config.global_rope_theta == 160000.0
    assert all(torch.equal(source[k], v) for k, v in got.state_dict().items())
    assert "global_rope_theta=160000.0" in proc.stdout.split("# model: ")[1].splitlines()[0]
    # the same weights and batch, bit-exact otherwise: only the rotation of the global layers differs (slightly,
    # in 48-token sequences)
    assert losses(raised)[1] != losses(same)[1]

    extended = tmp_path / "extended"  # and it trains, on 2 processes
    run(TORCHRUN, extended, config, *once[2:], "--max_steps=3", "--max_seqlen=96",
        f"--model_args={tiny}, 'global_rope_theta': 160000.0}}")
    trained = ModernBERT.from_pretrained(extended / "hf").state_dict()
    assert not all(torch.equal(source[k], v) for k, v in trained.items())
    assert all(math.isfinite(v) for v in losses(extended).values()) and sorted(losses(extended)) == [1, 3]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(config, tmp_path):
    out = tmp_path / "out"
    run([sys.executable], out, config, "--max_steps=3", "--checkpoint_every=1", "--eval_every=0")
    proc = run([sys.executable], out, config, "--lr=1e30", "--warmup_steps=1", "--checkpoint_every=1",
               "--eval_every=0", check=False)  # resumed at step 3
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: step ") and ("nan" in message or "inf" in message), message
    failed = int(message.split()[2].rstrip(":"))
    saved = checkpoint.list_checkpoints(out)
    assert saved and saved[-1].name == f"ckpt_{failed - 1}" and len(saved) > 1
    assert message.endswith(f"stopped before the update (last checkpoint: {saved[-1]})")
    assert not list(out.glob("ckpt_*.tmp"))
    exported = subprocess.run([sys.executable, "train.py", "--export", str(saved[-1]), str(tmp_path / "hf")],
                              cwd=REPO, env=ENV, capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    ModernBERT.from_pretrained(tmp_path / "hf")


def test_a_finite_loss_with_an_overflowing_gradient_stops_before_the_update(config, tmp_path):
    """Gradients that overflow at step 3 (4 micro-steps a step) while its loss stays finite: the run stops before
    that update would turn the weights to NaN and the next checkpoint with them; step 2's stays the newest."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tests/overflowing_gradient.py", "9", str(config), f"--out_dir={out}",
                           "--max_steps=4", "--checkpoint_every=1", "--eval_every=0"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and re.fullmatch(
        rf"error: step 3: loss \d+\.\d+, grad norm (nan|inf); stopped before the update \(last checkpoint: "
        rf"{re.escape(str(out / 'ckpt_2'))}\)\n", proc.stderr), proc.stderr
    assert checkpoint.list_checkpoints(out) == [out / "ckpt_1", out / "ckpt_2"]
    weights, _ = checkpoint.load_model(out / "ckpt_2")
    assert all(torch.isfinite(p).all() for p in weights.parameters())


def test_export_matches_final_weights(reference, tmp_path):
    ckpt = checkpoint.list_checkpoints(reference)[-1]
    assert ckpt.name == f"ckpt_{STEPS}"
    proc = subprocess.run([sys.executable, "train.py", "--export", str(ckpt)], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a = ModernBERT.from_pretrained(reference / "hf").state_dict()
    b = ModernBERT.from_pretrained(reference / f"hf_{STEPS}").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((ckpt / "meta.json").read_text())
    tokenizer = (REPO / meta["config"]["tokenizer"]).read_bytes()
    for hf in ("hf", f"hf_{STEPS}"):  # the tokenizer; which run, config and commit, not the checkpoint's own files
        assert (reference / hf / "tokenizer.model").read_bytes() == tokenizer, hf
        assert json.loads((reference / hf / "training.json").read_text()) == {k: v for k, v in meta.items()
                                                                              if k != "files"}, hf
    # the end of a run and --export write the same files (tokenizer.json, sentence-transformers' modules, ...)
    compared = lambda p: p.is_file() and p.name not in ("model.safetensors", "training.json")  # both seen above
    files = {hf: {str(p.relative_to(reference / hf)): p.read_bytes() for p in (reference / hf).rglob("*")
                  if compared(p)} for hf in ("hf", f"hf_{STEPS}")}
    assert {"tokenizer.json", "tokenizer_config.json", "modules.json", "1_Pooling/config.json"} <= files["hf"].keys()
    assert files["hf"] == files[f"hf_{STEPS}"]
    assert meta["step"] == STEPS and meta["world_size"] == 1 and meta["config"]["seed"] == 0
    damaged = tmp_path / ckpt.name
    shutil.copytree(ckpt, damaged)
    damage(damaged, "flipped")
    proc = subprocess.run([sys.executable, "train.py", "--export", str(damaged), str(tmp_path / "hf")], cwd=REPO,
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "(altered)" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "hf").exists()


# ---- warmup-stable-decay, branched decays -----------------------------------------------------------------


WSD = ["--schedule=wsd", "--max_steps=8", "--decay_steps=3", "--decay_shape=1-sqrt", "--min_lr_ratio=0.1",
       "--log_every=1", "--eval_every=0", "--retrieval_eval=", "--checkpoint_every=3"]


def wsd_lr(step, lr, warmup, max_steps, decay, shape, ratio):
    """The learning rate of the update that makes step + 1, written out: warmup (its first update already moves),
    lr held, then the last `decay` updates going down, the last at ratio x lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < max_steps - decay:
        return lr
    p = (step - (max_steps - decay) + 1) / decay  # 1/decay, 2/decay, ..., 1
    left = {"linear": 1 - p, "1-sqrt": 1 - p ** 0.5, "cosine": 0.5 + 0.5 * math.cos(math.pi * p)}[shape]
    return lr * ratio + lr * (1 - ratio) * left


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
def test_wsd_lr_schedule_written_out(shape):
    cfg = train.Config(lr=2.0, warmup_steps=2, max_steps=10, schedule="wsd", decay_steps=4, decay_shape=shape,
                       min_lr_ratio=0.1)
    got = [train.lr_at(cfg, s) for s in range(10)]
    assert got == pytest.approx([wsd_lr(s, 2.0, 2, 10, 4, shape, 0.1) for s in range(10)], rel=1e-12, abs=0)
    assert got[:6] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0] and got[-1] == pytest.approx(0.2, rel=1e-12)  # first, last
    assert got[6] == pytest.approx({"linear": 1.55, "1-sqrt": 1.1, "cosine": 0.2 + 1.8 * (2 + 2 ** 0.5) / 4}[shape])
    constant = train.Config(lr=2.0, warmup_steps=0, max_steps=5, schedule="wsd")  # decay_steps 0: lr to the end
    assert [train.lr_at(constant, s) for s in range(5)] == [2.0] * 5
    cfg = train.Config(lr=1.0, warmup_steps=0, max_steps=3, schedule="wsd", decay_steps=3)  # all decay, to 0
    assert [train.lr_at(cfg, s) for s in range(3)] == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-15)


def losses(out_dir):
    return {m["step"]: m["loss"] for m in metrics(out_dir) if "loss" in m}


def test_resume_from_continues_another_runs_checkpoint_in_a_new_out_dir(config, tmp_path):
    """A wsd run to step 8; a run with resume_from its step-3 checkpoint gives the same losses for steps 4..8 (bit for
    bit on 1 process, to 1e-5 on 2), each step's lr the schedule's; its rerun resumes from its own checkpoints."""
    whole = tmp_path / "whole"
    run([sys.executable], whole, config, *WSD)
    expected = {m["step"]: m for m in metrics(whole) if "loss" in m}
    assert [m["lr"] for m in expected.values()] == pytest.approx(
        [wsd_lr(s, 3e-3, 2, 8, 3, "1-sqrt", 0.1) for s in range(8)], rel=1e-12)
    branch = tmp_path / "branch"
    proc = run([sys.executable], branch, config, *WSD, f"--resume_from={whole / 'ckpt_3'}")
    assert f"resuming from {whole / 'ckpt_3'} (resume_from) at step 3\n" in proc.stdout  # nothing else changed
    got = [m for m in metrics(branch) if "loss" in m]
    assert [m["step"] for m in got] == [4, 5, 6, 7, 8]
    assert got == [expected[m["step"]] for m in got]  # loss, lr, grad norm, tokens: bit for bit
    assert sorted(p.name for p in branch.glob("ckpt_*")) == ["ckpt_6", "ckpt_8"]
    assert sorted(p.name for p in whole.glob("ckpt_*")) == ["ckpt_3", "ckpt_6", "ckpt_8"]  # left as it was

    rewind(branch, tmp_path / "again", step=6)  # a rerun of the branch: its own ckpt_6, not resume_from's
    proc = run([sys.executable], tmp_path / "again", config, *WSD, f"--resume_from={whole / 'ckpt_3'}")
    assert f"resuming from {tmp_path / 'again' / 'ckpt_6'} at step 6" in proc.stdout  # out_dir changed: a copy
    assert "(resume_from)" not in proc.stdout
    assert metrics(tmp_path / "again") == metrics(branch)
    rewind(branch, tmp_path / "later", step=6)  # the same once the run it branched from is gone (keep_last)
    proc = run([sys.executable], tmp_path / "later", config, *WSD, f"--resume_from={tmp_path / 'gone' / 'ckpt_3'}")
    assert f"resuming from {tmp_path / 'later' / 'ckpt_6'} at step 6" in proc.stdout
    assert "(resume_from)" not in proc.stdout
    assert metrics(tmp_path / "later") == metrics(branch)

    for world in (2, 3):  # by token budget on 3: 8 sequences do not split into micro-batches of 2 there
        out = tmp_path / f"on{world}"
        proc = run([*TORCHRUN[:-1], f"--nproc_per_node={world}"], out, config, *WSD, *["--micro_batch_tokens=96"] * (
            world == 3), f"--resume_from={whole / 'ckpt_3'}")
        assert f"written by 1 processes, now {world}" in proc.stdout
        got = [m for m in metrics(out) if "loss" in m]
        assert [(m["step"], m["lr"], m["tokens"]) for m in got] == [(s, expected[s]["lr"], expected[s]["tokens"])
                                                                      for s in range(4, 9)]
        for m in got:
            for key in ("loss", "grad_norm"):
                assert m[key] == pytest.approx(expected[m["step"]][key], rel=1e-5, abs=0), (world, m["step"], key)


def test_a_constant_run_is_extended_and_a_decay_branched_from_it(config, tmp_path):
    """wsd without a decay holds lr; extending max_steps continues it (the resume line says the past rates are
    unchanged); a decay branched from its step-4 checkpoint on 2 processes follows the cosine formula; extending a
    run already in its decay is a config difference."""
    constant = tmp_path / "constant"
    common = ["--schedule=wsd", "--log_every=1", "--eval_every=0", "--retrieval_eval=", "--checkpoint_every=2"]
    run([sys.executable], constant, config, *common, "--max_steps=4")
    proc = run([sys.executable], constant, config, *common, "--max_steps=6")
    assert (f"resuming from {constant / 'ckpt_4'} at step 4; max_steps 4 -> 6: the stable phase continues, the "
            f"learning rates so far are unchanged\n") in proc.stdout
    assert [m["lr"] for m in metrics(constant) if "loss" in m] == [1.5e-3] + [3e-3] * 5

    decay = tmp_path / "decay"
    branch = ["--max_steps=7", "--decay_steps=3", "--decay_shape=cosine", "--min_lr_ratio=0.01"]
    proc = run(TORCHRUN, decay, config, *common, *branch, f"--resume_from={constant / 'ckpt_4'}")
    assert (f"resuming from {constant / 'ckpt_4'} (resume_from) at step 4; max_steps 4 -> 7, decay_steps 0 -> 3, "
            f"decay_shape 'linear' -> 'cosine', min_lr_ratio 0.0 -> 0.01: the stable phase continues") in proc.stdout
    lrs = {m["step"]: m["lr"] for m in metrics(decay) if "loss" in m}
    assert lrs == pytest.approx({s + 1: wsd_lr(s, 3e-3, 2, 7, 3, "cosine", 0.01) for s in (4, 5, 6)}, rel=1e-12)
    assert lrs[7] == pytest.approx(3e-5, rel=1e-12)
    assert losses(decay)[5] == pytest.approx(losses(constant)[5], rel=1e-5)  # step 5: same state, lower lr
    assert losses(decay)[6] != pytest.approx(losses(constant)[6], rel=1e-5)

    proc = run([sys.executable], decay, config, *common, "--max_steps=9", "--decay_steps=5", *branch[2:],
               f"--resume_from={constant / 'ckpt_4'}")
    assert (f"resuming from {decay / 'ckpt_7'} at step 7; config changed since: {{'max_steps': (7, 9), "
            f"'decay_steps': (3, 5)}}; written by 2 processes, now 1\n") in proc.stdout


# ---- batch-size warmup ------------------------------------------------------------------------------------


WARM = dict(batch_size=8, batch_size_start=2, batch_warmup_tokens=700)


def loader_class(cfg):
    return data.Mixture if isinstance(cfg.data_dir, dict) else data.Loader


def warm_batches(cfg, steps, mode="line_by_line"):
    """The plain reference: samples one at a time from the stream (a loader of batches of 1: the same samples and
    masks), grouped into global batches whose sizes grow from 2 by 2 up to 8 with the tokens of the batches before,
    linearly over the first 700 tokens. -> [(size, tokens, sorted sequences (input_ids, labels), the samples)]"""
    one = loader_class(cfg)(cfg.data_dir, batch_size=1, micro_batch_size=1, max_seqlen=cfg.max_seqlen, seed=cfg.seed,
                            mode=mode, mlm_probability=cfg.mlm_probability, tokenizer=data.Tokenizer(cfg.tokenizer))
    samples, seen, out = iter(one), 0, []
    for _ in range(steps):
        grown = Fraction(2) + Fraction(8 - 2) * seen / 700
        size = 8 if seen >= 700 else min(8, 2 * math.floor(grown / 2))
        batch = [next(samples)[0] for _ in range(size)]
        tokens = sum(int(mb["cu_seqlens"][-1]) for mb in batch)
        out.append((size, tokens, sequences(batch), batch))
        seen += tokens
    return out


def sequences(micro_batches):
    """Every sequence of some micro-batches as (input_ids, labels), sorted; empty micro-batches left out."""
    found = []
    for mb in micro_batches:
        if not mb.get("empty"):
            cu = mb["cu_seqlens"].tolist()
            found += [(tuple(mb["input_ids"][a:b].tolist()), tuple(mb["labels"][a:b].tolist()))
                      for a, b in zip(cu, cu[1:])]
    return sorted(found)


@pytest.mark.parametrize("world,micro,budget,mode,corpora", [
    (1, 2, 0, "line_by_line", "config"), (2, 1, 0, "line_by_line", "config"), (3, 1, 96, "line_by_line", "config"),
    (2, 1, 0, "packed", "config"), (2, 1, 0, "line_by_line", "mixture"), (3, 1, 96, "packed", "mixture")])
def test_batch_size_warmup_gives_the_plain_loops_batches(request, world, micro, budget, mode, corpora):
    cfg, _ = train.load_config([str(request.getfixturevalue(corpora))])  # one corpus, or a 3:1 mixture of two
    expected = warm_batches(cfg, 12, mode)
    assert [size for size, *_ in expected][:2] == [2, 2] and expected[-1][0] == 8  # it grows within 12 steps
    assert len({size for size, *_ in expected}) == 4
    loaders = [loader_class(cfg)(cfg.data_dir, batch_size=8, micro_batch_size=micro, max_seqlen=cfg.max_seqlen,
                                 rank=r, world_size=world, seed=cfg.seed, mode=mode,
                                 mlm_probability=cfg.mlm_probability, micro_batch_tokens=budget, batch_size_start=2,
                                 batch_warmup_tokens=700, tokenizer=data.Tokenizer(cfg.tokenizer))
               for r in range(world)]
    for step, (size, tokens, seqs, _) in enumerate(expected):
        assert all(loader.global_batch(loader.seen) == size for loader in loaders), step
        got = [next(iter(loader)) for loader in loaders]
        assert len({len(g) for g in got}) == 1  # as many micro-steps on every rank
        assert sequences([mb for g in got for mb in g]) == seqs, step
        if step == 5:  # a resume mid-warmup continues the same batches
            state = loaders[0].state_dict()
            assert len({json.dumps(loader.state_dict()) for loader in loaders}) == 1
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))


def test_batch_size_warmup_losses_are_a_plain_loops(config, tmp_path):
    """train.py's first steps with a growing batch, written out without it: each step's loss the mean over its global
    batch's masked tokens (batches of 2, 2, 2, 4, 4 sequences), AdamW at the linear schedule's rate."""
    args = ["--batch_size_start=2", "--batch_warmup_tokens=700", "--max_steps=5", "--log_every=1", "--eval_every=0",
            "--retrieval_eval=", "--checkpoint_every=100", "--weight_decay=0.0", "--grad_clip=1e9"]
    run([sys.executable], tmp_path / "out", config, *args)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    got = [m for m in lines if "loss" in m]  # with batch_size, which metrics() leaves out
    cfg, _ = train.load_config([str(config), *args])
    tok = data.Tokenizer(cfg.tokenizer)
    ids = dict(pad_token_id=tok.pad_id, cls_token_id=tok.cls_id, sep_token_id=tok.sep_id, mask_token_id=tok.mask_id)
    torch.manual_seed(cfg.seed)
    model = ModernBERT(ModernBertConfig.preset("tiny", vocab_size=tok.vocab_size, **cfg.model_args, **ids))
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    batches = warm_batches(cfg, 5)
    assert [size for size, *_ in batches] == [2, 2, 2, 4, 4]
    for step, (size, tokens, _, batch) in enumerate(batches):
        loss, masked = 0.0, 0
        for mb in batch:
            logits = model(mb["input_ids"], cu_seqlens=mb["cu_seqlens"], max_seqlen=mb["max_seqlen"])[0]
            labels = mb["labels"]
            loss = loss + F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum")
            masked += int((labels != -100).sum())
        (loss / masked).backward()
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * (step + 1) / 2 if step < 2 else 3e-3 * (5 - step) / 3
        optimizer.step()
        optimizer.zero_grad()
        m = got[step]
        assert (m["step"], m["batch_size"], m["tokens"]) == (step + 1, size, tokens)
        assert m["loss"] == pytest.approx(loss.item() / masked, rel=1e-5), m


def test_batch_size_warmup_trains_and_resumes_mid_warmup_on_another_number_of_processes(config, tmp_path):
    warm = tmp_path / "warm.py"
    warm.write_text(config.read_text() + "batch_size_start = 2\nbatch_warmup_tokens = 700\nmicro_batch_size = 1\n"
                    "max_steps = 10\nlog_every = 1\neval_every = 5\nretrieval_eval = ''\ncheckpoint_every = 2\n")
    cfg, _ = train.load_config([str(warm)])
    expected = warm_batches(cfg, 10)
    whole = tmp_path / "whole"
    proc = run([sys.executable], whole, warm)
    assert "batch-size warmup: 2 sequences per step at first, growing in multiples of it to 8 over the first 700 " \
           "tokens" in proc.stdout
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [(m["batch_size"], m["tokens"]) for m in lines if "loss" in m] == [(n, t) for n, t, *_ in expected]
    killed = run_and_kill(TORCHRUN, tmp_path / "out", warm, logged_step(3))
    assert_same_curve(killed, metrics(whole)[:len(killed)], rel=1e-5)
    proc = run([sys.executable], tmp_path / "out", warm)
    step = int(re.search(r"resuming from \S+ckpt_(\d+) at step", proc.stdout).group(1))
    assert 2 <= step and expected[step][0] < 8  # resumed before the batch reached its full size
    assert_same_curve(metrics(tmp_path / "out"), metrics(whole), rel=1e-5)
    three = tmp_path / "three"  # by token budget: batches of 2 sequences on 3 processes
    run([*TORCHRUN[:-1], "--nproc_per_node=3"], three, warm, "--micro_batch_tokens=96")
    assert_same_curve(metrics(three), metrics(whole), rel=1e-5)


@pytest.fixture(scope="module")
def mixture(config, tmp_path_factory):
    """The tiny config on a 3:1 mixture of its corpus and a small corpus of short documents (same tokenizer)."""
    root = tmp_path_factory.mktemp("mixture")
    cfg, _ = train.load_config([str(config)])
    rows = [{"text": f"短い文書の {i} 番目。" + "いろは" * (i % 5)} for i in range(16)]
    data.prepare([str(write_jsonl(root / "small.jsonl", rows))], cfg.tokenizer, root / "small", val_fraction=0.3)
    path = root / "mixture.py"
    path.write_text(config.read_text() + f"data_dir = {{{cfg.data_dir!r}: 3, {str(root / 'small')!r}: 1}}\n"
                    "max_steps = 10\nlog_every = 1\neval_every = 5\neval_batches = 3\nretrieval_eval = ''\n"
                    "checkpoint_every = 2\nmicro_batch_size = 1\n")
    return path


def test_a_mixture_trains_records_its_corpora_and_resumes_on_another_number_of_processes(mixture, tmp_path):
    """Killed on 2 processes and resumed on 1, a mixture's run is the uninterrupted 1-process run (to 1e-5); its
    metrics record each corpus's tokens (the step's tokens, summed) and epochs."""
    whole = tmp_path / "whole"
    proc = run([sys.executable], whole, mixture)
    assert re.search(r"mixture of \S+ \(75\.0% of the tokens\), \S+small \(25\.0% of the tokens\)", proc.stdout)
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [sum(c["tokens"] for c in m["corpora"].values()) for m in steps] == \
        list(itertools.accumulate(m["tokens"] for m in steps))
    small = next(v for k, v in steps[-1]["corpora"].items() if k.endswith("small"))
    assert small["epochs"] > 1  # upsampled: the small corpus was read more than once
    assert 0.2 < small["tokens"] / sum(c["tokens"] for c in steps[-1]["corpora"].values()) < 0.3
    killed = run_and_kill(TORCHRUN, tmp_path / "out", mixture, logged_step(5))
    assert_same_curve(killed, metrics(whole)[:len(killed)], rel=1e-5)
    proc = run([sys.executable], tmp_path / "out", mixture)
    assert "resuming from" in proc.stdout and "written by 2 processes, now 1" in proc.stdout
    assert_same_curve(metrics(tmp_path / "out"), metrics(whole), rel=1e-5)
    three = tmp_path / "three"  # by token budget on 3 processes
    run([*TORCHRUN[:-1], "--nproc_per_node=3"], three, mixture, "--micro_batch_tokens=96")
    assert_same_curve(metrics(three), metrics(whole), rel=1e-5)


def test_mixture_errors_are_one_line(config, mixture, monkeypatch, capsys, tmp_path):
    cfg, _ = train.load_config([str(mixture)])
    big, small = list(cfg.data_dir)
    for weights, message in (({big: 3, small: -1}, f"the weight of {small} must be a number above 0, got -1"),
                             ({big: 3, small: 0}, f"the weight of {small} must be a number above 0, got 0"),
                             ({big: 3, 7: 1}, "a mixture's shard directories are strings, got int 7"),
                             ({}, "a mixture names no shard directory")):
        assert config_error(capsys, mixture, f"--data_dir={weights!r}") == \
            f"error: command line: config key 'data_dir': {message}"
    assert "demo_data and data_dir" in config_error(capsys, mixture, "--demo_data=True")
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, mixture, f"--out_dir={out}", f"--data_dir={{{big!r}: 1, 'nowhere': 1}}")
    assert code == 1 and err.startswith(f"error: {mixture}: input missing: data_dir nowhere (= ") and \
        len(err.splitlines()) == 1
    tok = data.train_tokenizer([str(Path(big).parent / "demo" / "corpus.jsonl")], 900, tmp_path / "other.model")
    data.prepare([str(write_jsonl(tmp_path / "o.jsonl", [{"text": "別の文書"}] * 5))], tok, tmp_path / "other",
                 val_fraction=0.5)
    proc = run(TORCHRUN, out, mixture, f"--data_dir={{{big!r}: 1, {str(tmp_path / 'other')!r}: 1}}", check=False)
    assert proc.returncode != 0 and "does not match the one" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # one line per machine
    assert len(errors) == 1 and re.fullmatch(r"error: rank 0 \(\S+\): tokenizer \S+ \(sha256 \w+\) does not match "
                                             r"the one \S+other was prepared with \(other\.model, sha256 \w+\)",
                                             errors[0]), errors
    assert train.same_input("data_dir", {big: 3, small: 1}, {str(Path(big) / ".." / Path(big).name): 3, small: 1})
    assert not train.same_input("data_dir", {big: 3, small: 1}, {big: 3, small: 2})
    assert not train.same_input("data_dir", {big: 3, small: 1}, big)
    assert not list(out.glob("ckpt_*"))


# ---- configuration ----------------------------------------------------------------------------------------


def config_error(capsys, *args):
    with pytest.raises(ranks.Problem) as e:
        train.load_config([str(a) for a in args])
    assert len(str(e.value).splitlines()) == 1
    return f"error: {e.value}"


def test_config_errors_name_the_key(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text('out_dir = "out/x"\nmax_step = 10\n')
    assert config_error(capsys, path) == f"error: {path}:2: unknown config key 'max_step'"
    path.write_text('out_dir = "out/x"\nlr = "fast"\n')
    assert config_error(capsys, path).startswith(f"error: {path}:2: config key 'lr' must be float")
    path.write_text("compile = 1\n")
    assert "config key 'compile' must be bool" in config_error(capsys, path)
    path.write_text("mode = 'lines'\n")
    assert "config key 'mode' must be one of line_by_line, packed" in config_error(capsys, path)
    path.write_text("model_args = dict(hidden=64)\n")
    assert "config key model_args: 'hidden' is not a ModernBertConfig field" in config_error(capsys, path)
    path.write_text("model = 'huge'\n")
    assert "config key model: unknown preset 'huge'" in config_error(capsys, path)
    path.write_text("max_steps = 10 +\n")
    assert config_error(capsys, path).startswith(f"error: {path}:1: ")
    path.write_text("max_steps = 10\n")
    assert config_error(capsys, path, "--max_stepz=3") == "error: command line: unknown config key 'max_stepz'"
    assert "config key 'max_steps' must be int, got str 'ten'" in config_error(capsys, path, "--max_steps=ten")
    assert "is not --key=value" in config_error(capsys, path, "--max_steps")
    assert "no such file" in config_error(capsys, tmp_path / "nope.py")
    for key in ("max_steps", "log_every", "checkpoint_every", "keep_last", "batch_size", "micro_batch_size",
                "max_seqlen", "collective_timeout"):  # 0 would loop forever, divide by zero or keep nothing
        assert config_error(capsys, path, f"--{key}=0") == f"error: command line: config key {key!r} must be at least 1, got 0"


def test_bad_schedule_and_resume_from_values_are_one_line(config, reference, monkeypatch, capsys, tmp_path):
    path = tmp_path / "c.py"
    path.write_text("max_steps = 10\nwarmup_steps = 2\nschedule = 'wsd'\n")
    assert config_error(capsys, path, "--decay_steps=9") == ("error: config key decay_steps: 9 decay steps after 2 "
                                                             "warmup steps do not fit in max_steps 10")
    assert config_error(capsys, path, "--decay_steps=-1") == "error: config key decay_steps must be at least 0, got -1"
    for ratio in ("-0.1", "1.5"):
        assert config_error(capsys, path, f"--min_lr_ratio={ratio}") == \
            f"error: config key min_lr_ratio must be between 0 and 1, got {float(ratio)}"
    assert "config key 'decay_shape' must be one of linear, 1-sqrt, cosine, got 'sqrt'" in config_error(
        capsys, path, "--decay_shape=sqrt")
    assert "config key 'schedule' must be one of linear, wsd" in config_error(capsys, path, "--schedule=constant")
    assert config_error(capsys, path, "--schedule=linear", "--decay_steps=3").startswith(
        "error: config keys decay_steps, decay_shape and min_lr_ratio shape schedule 'wsd' only")
    assert "init_from and resume_from: give one" in config_error(capsys, path, "--init_from=a", "--resume_from=b")
    train.load_config([str(path), "--decay_steps=8", "--min_lr_ratio=1.0"])  # the limits themselves are fine
    assert "batch_size_start and batch_warmup_tokens: give both" in config_error(capsys, path, "--batch_size_start=2")
    assert config_error(capsys, path, "--batch_size_start=2", "--batch_warmup_tokens=-5") == \
        "error: config key batch_warmup_tokens must be at least 0, got -5"
    assert config_error(capsys, path, "--batch_size=8", "--batch_size_start=16", "--batch_warmup_tokens=100") == \
        "error: config key batch_size_start must be between 1 and batch_size 8, got 16"
    cfg, _ = train.load_config([str(config), "--batch_size_start=3", "--batch_warmup_tokens=100",
                                "--micro_batch_size=1"])
    assert train.check_inputs(cfg, config, 2) == ("batch_size_start 3 is not a multiple of 2 processes x "
                                                  "micro_batch_size 1; batch_size_start must be a multiple of the 2 "
                                                  "processes (or set micro_batch_tokens)")

    out = tmp_path / "out"
    for where in (reference, tmp_path / "nowhere"):  # a run directory is not a checkpoint
        code, _, err = cli(monkeypatch, capsys, config, f"--out_dir={out}", f"--resume_from={where}")
        assert code == 1 and err == (f"error: {config}: input missing: resume_from {where}: not a checkpoint (no "
                                     f"meta.json); name a ckpt_STEP directory of another run\n")
    damaged = tmp_path / "damaged"
    shutil.copytree(reference / "ckpt_9", damaged)
    (damaged / "rank0.pt").write_bytes(b"")
    proc = run([sys.executable], out, config, f"--resume_from={reference / 'ckpt_9'}", "--max_steps=8", check=False)
    assert proc.returncode == 1 and proc.stderr == f"error: {reference / 'ckpt_9'} is at step 9, past max_steps 8\n"
    proc = run([sys.executable], out, config, f"--resume_from={damaged}", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: resume_from {damaged / 'rank0.pt'}: 0 bytes")
    shards, other = train.load_config([str(config)])[0].data_dir, tmp_path / "shards"
    shutil.copytree(shards, other)
    proc = run(TORCHRUN, out, config, f"--resume_from={reference / 'ckpt_9'}", f"--data_dir={other}",
               "--mode=packed", check=False)
    line = (f"resume_from {reference / 'ckpt_9'}: data_dir {shards!r} there, {str(other)!r} here, mode "
            f"'line_by_line' there, 'packed' here (a run continues on the data it was trained on)")
    assert proc.returncode != 0
    for r in (0, 1):  # every rank says it (their lines may interleave on one stderr)
        assert f"error: rank {r} ({socket.gethostname()}): {line}" in proc.stderr, proc.stderr[-2000:]
    assert not list(out.glob("ckpt_*")) and not (out / "hf").exists()


def test_config_differences_name_every_key_either_side_has():
    a = {"hidden_size": 32, "num_hidden_layers": 2, "global_attn_every_n_layers": 2}
    b = {"hidden_size": 32, "num_hidden_layers": 2, "global_attn_every_n_layers": 3, "classifier_pooling": "mean"}
    assert checkpoint.config_differences(a, b) == {"classifier_pooling": (None, "mean")}  # layer 0 global in both
    assert checkpoint.config_differences({**b, "hidden_size": 64}, a) == {"classifier_pooling": ("mean", None),
                                                                         "hidden_size": (64, 32)}


def test_config_merging_and_lookup(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('max_steps = 10\nlr = 1  # an int where a float is expected is fine\nbetas = (0.9, 0.95)\n')
    cfg, _ = train.load_config([str(path), "--out_dir=out/y", "--lr=2e-4", "--compile=True", "--model_args={'hidden_size': 96}"])
    assert (cfg.max_steps, cfg.lr, cfg.betas, cfg.out_dir, cfg.compile) == (10, 2e-4, (0.9, 0.95), "out/y", True)
    assert cfg.model_args == {"hidden_size": 96} and cfg.warmup_steps == train.Config().warmup_steps
    for name in ("configs/stage2.py", "config/stage2.py", "stage2"):  # found by file name in configs/
        cfg, found = train.load_config([name])
        assert found.resolve() == REPO / "configs" / "stage2.py" and cfg.max_seqlen == 8192 and cfg.init_from


def test_config_error_from_the_command_line_exits(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "demo", "--batch_sise=8"], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "error: command line: unknown config key 'batch_sise'\n"


def cli(monkeypatch, capsys, *args, **env):
    """train.py's main() in this process (it stops before any process group work here): (exit code, out, err)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        train.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_setting_with_its_default(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "--help")
    assert code == 0 and not err
    for f in fields(train.Config):
        default = f"--{f.name}={getattr(train.Config(), f.name)!r}"
        line = next(line.strip() for line in out.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert line.startswith(default) and line[len(default):].strip(), line  # the default, then its meaning


def test_demo_divides_for_1_2_4_processes_and_the_error_names_what_would(monkeypatch, capsys):
    cfg, _ = train.load_config(["demo"])
    assert all(cfg.batch_size % (world * cfg.micro_batch_size) == 0 for world in (1, 2, 4))
    monkeypatch.chdir(REPO)
    code, _, err = cli(monkeypatch, capsys, "demo", "--micro_batch_size=8", WORLD_SIZE="2")
    assert code == 1 and err == "error: batch_size 8 is not a multiple of 2 processes x micro_batch_size 8; " \
                                "micro_batch_size can be 1, 2, 4\n"


def test_missing_inputs_are_named_at_once_with_how_to_make_them(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # the config's relative paths: nothing there
    code, _, err = cli(monkeypatch, capsys, "stage2")
    assert code == 1 and not list(tmp_path.iterdir())
    lines = err.splitlines()
    assert lines[0] == f"error: {REPO / 'configs' / 'stage2.py'}: 4 inputs missing:"
    assert [line.split()[0] for line in lines[1:]] == ["data_dir", "tokenizer", "retrieval_eval", "init_from"]
    assert "python data.py prepare" in lines[1] and "python data.py tokenizer" in lines[2]
    assert lines[4].endswith("make it with python train.py configs/stage1.py")


def test_kernels_without_cuda_is_one_line(monkeypatch, capsys, config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test session runs the kernels interpreted
    code, _, err = cli(monkeypatch, capsys, config, f"--out_dir={tmp_path / 'out'}", MODERNBERT_ATTENTION="kernels")
    assert code == 1 and err.startswith("error: MODERNBERT_ATTENTION=kernels needs a CUDA GPU")
    assert len(err.splitlines()) == 1


def test_stage_configs_follow_the_paper():
    """Table 1: (max length, steps, global batch, peak LR, warmup) per stage; AdamW 0.9/0.98, eps 1e-6, wd 1e-5."""
    paper = ((0.9, 0.98), 1e-6, 1e-5, 1.0, 0.3)  # betas, eps, weight decay, clipping, masking rate
    for name, recipe in (("stage1", (1024, 500_000, 3328, 5e-4, 24_000)), ("stage2", (8192, 200_000, 384, 5e-5, 24_000))):
        cfg, _ = train.load_config([name])
        assert (cfg.max_seqlen, cfg.max_steps, cfg.batch_size, cfg.lr, cfg.warmup_steps) == recipe
        assert (cfg.betas, cfg.eps, cfg.weight_decay, cfg.grad_clip, cfg.mlm_probability) == paper
        assert cfg.model == "llm-jp-modernbert-base" and cfg.mode == "line_by_line"
    stage1, _ = train.load_config(["stage1"])
    stage2, _ = train.load_config(["stage2"])
    assert not stage1.init_from and stage2.init_from == f"{stage1.out_dir}/hf"
    # the demo sets none of these, so it trains with the defaults: they must be the paper's too
    for cfg in (train.Config(), train.load_config(["demo"])[0]):
        assert (cfg.betas, cfg.eps, cfg.weight_decay, cfg.grad_clip, cfg.mlm_probability) == paper


def test_lr_schedule_written_out():
    """Linear warmup to the peak over warmup_steps (the first step already moves), then linear decay that
    reaches 0 at max_steps; lr_at(step) is the rate of the update that makes step + 1."""
    cfg = train.Config(lr=1.0, warmup_steps=4, max_steps=10)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert [train.lr_at(cfg, s) for s in range(10)] == pytest.approx(expected, abs=1e-12)
    cfg = train.Config(lr=2.0, warmup_steps=0, max_steps=4)
    assert [train.lr_at(cfg, s) for s in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5], abs=1e-12)


def test_real_tokenizer_gives_the_released_vocabulary(llmjp_tokenizer):
    config = train.model_config(train.Config(), data.Tokenizer(llmjp_tokenizer))
    # the released tokenizer: 99,574 pieces; <PAD> 4, <CLS> 5, <SEP> 6, <MASK> 3
    assert (config.vocab_size, config.pad_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id) == \
        (99574, 4, 5, 6, 3)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (768, 22, 1152)


# ---- several nodes: two torchrun launchers on 127.0.0.1 -------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_everything_in(dirs):
    """SIGKILL every process whose working directory is one of the node directories (a torchrun worker that lost
    its launcher included); a stopped process dies too."""
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            here = Path(os.readlink(cwd))
        except OSError:
            continue
        if any(here == d or d in here.parents for d in dirs) and int(cwd.parent.name) != os.getpid():
            try:
                os.kill(int(cwd.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


class Nodes:
    """Two `torchrun --nnodes=2 --nproc_per_node=1` launchers as two nodes run them, each in its own directory (its
    relative paths are its own), node n at address 127.0.0.{n+1} (c10d ranks follow the addresses), node 0
    hosting the rendezvous. Leaving the `with` block kills whatever they left running."""

    def __init__(self, dirs, *args, restarts=0, env=(), script=REPO / "train.py"):
        self.dirs, self.script, self.procs, port = dirs, Path(script).name, [], free_port()
        for n, d in enumerate(dirs):
            with open(d / "launcher.log", "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                     "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--local_addr=127.0.0.{n + 1}",
                     f"--rdzv_conf=is_host={int(n == 0)}", f"--max-restarts={restarts}", str(script),
                     *map(str, args)], cwd=d, env={**ENV, **dict(env)}, stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            for pid in process_tree(proc.pid) if proc.poll() is None else []:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        kill_everything_in(self.dirs)

    def log(self, n):
        return (self.dirs[n] / "launcher.log").read_text(errors="replace")

    def errors(self, n):
        """The lines train.py printed as errors on node n (torchrun's summary repeats them indented)."""
        return [line for line in self.log(n).splitlines() if line.startswith("error: ")]

    def worker(self, n):
        return next(p for p in process_tree(self.procs[n].pid)[1:]
                    if self.script in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"))

    def wait_until(self, condition, limit=300):
        deadline = time.time() + limit
        while not condition():
            assert all(p.poll() is None for p in self.procs) and time.time() < deadline, self.tails()
            time.sleep(0.005)

    def wait(self, limit=300):
        """-> (the launchers' exit codes, seconds until the last one exited)."""
        t0 = time.time()
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, limit - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs], time.time() - t0

    def tails(self):
        return "\n".join(f"--- node {n}:\n" + "\n".join(self.log(n).splitlines()[-25:]) for n in (0, 1))


@pytest.fixture(scope="module")
def node_config(config, tmp_path_factory):
    """The tiny config with each node's own inputs: data, tokenizer and retrieval file relative to the node's
    working directory."""
    text = config.read_text()
    for key, name in (("data_dir", "shards"), ("tokenizer", "tok.model"), ("retrieval_eval", "miracl.jsonl")):
        text = re.sub(rf"^{key} = .*$", f'{key} = "{name}"', text, flags=re.M)
    path = tmp_path_factory.mktemp("nodes") / "nodes.py"
    path.write_text(text)
    return path


def node_dirs(root, config, missing_on_node1=()):
    """Two node directories under root, each with its links to the inputs."""
    dirs = [root / "node0", root / "node1"]
    for n, d in enumerate(dirs):
        d.mkdir(parents=True)
        for name in {"shards", "tok.model", "miracl.jsonl"} - set(missing_on_node1 if n == 1 else ()):
            (d / name).symlink_to(config.parent / name)
    return dirs


@pytest.fixture(scope="module")
def two_nodes(config, node_config, tmp_path_factory):
    """An uninterrupted run on two nodes; its out_dir (shared by the nodes: an absolute path). Rank 1's first
    verification of the shards takes 15 s longer than the 10 s timeout without tripping the watchdog."""
    root = tmp_path_factory.mktemp("two_nodes")
    with Nodes(node_dirs(root, config), 15, node_config, f"--out_dir={root / 'out'}", "--collective_timeout=10",
               script=REPO / "tests" / "slow_verification.py") as job:
        assert job.wait()[0] == [0, 0], job.tails()
    return root / "out"


def evaluated(out, step):
    def until():
        try:
            return any(m["step"] == step and "val_loss" in m for m in metrics(out))
        except (OSError, json.JSONDecodeError, KeyError):
            return False
    return until


def test_two_nodes_match_one_process_and_meta_json_checksums_every_rank_files(two_nodes, reference):
    assert_same_curve(metrics(two_nodes), metrics(reference), rel=1e-5)
    for ckpt in checkpoint.list_checkpoints(two_nodes):
        meta = json.loads((ckpt / "meta.json").read_text())
        on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != "meta.json")
        assert sorted(meta["files"]) == on_disk and meta["world_size"] == 2
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt"} <= set(on_disk)
        for name, entry in meta["files"].items():
            raw = (ckpt / name).read_bytes()
            assert entry == {"size": len(raw), "crc32": f"{zlib.crc32(raw):08x}"}, (ckpt.name, name)


def test_a_killed_worker_ends_both_nodes_and_the_rerun_resumes_exactly(config, node_config, two_nodes, tmp_path):
    dirs, out = node_dirs(tmp_path, config), tmp_path / "out"
    with Nodes(dirs, node_config, f"--out_dir={out}") as job:
        job.wait_until(evaluated(out, 8))  # ckpt_3 and ckpt_6 are written
        os.kill(job.worker(1), signal.SIGKILL)
        codes, took = job.wait(120)
        assert codes[0] == 1 and codes[1] not in (0, None) and took < 30, (codes, took)
        lines = job.errors(0)
        assert len(lines) == 1 and re.match(r"error: rank 0 \(.+\): step \d+ \(.+\): a collective failed: ", lines[0])
    # a byte flipped in the newest checkpoint's file written by rank 1: every rank skips it for the one before
    *_, before, newest = checkpoint.list_checkpoints(out)
    flipped = newest / "__1_0.distcp"
    flip(flipped)
    with Nodes(dirs, node_config, f"--out_dir={out}") as job:
        assert job.wait()[0] == [0, 0], job.tails()
        log = job.log(0)
    assert f"skipping checkpoint {flipped}: CRC-32 " in log and "(altered)" in log
    assert f"resuming from {before} at step {checkpoint.step_of(before)}" in log
    assert metrics(out) == metrics(two_nodes)  # every step, bit for bit


def test_two_nodes_restart_by_themselves_and_finish_on_the_same_curve(config, node_config, two_nodes, tmp_path):
    # torchrun's store shared with the workers can hand a restarted worker a peer's old address: not sharing it
    # is what train.py's warning recommends
    dirs, out = node_dirs(tmp_path, config), tmp_path / "out"
    with Nodes(dirs, node_config, f"--out_dir={out}", restarts=1,
               env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}) as job:
        job.wait_until(evaluated(out, 8))
        os.kill(job.worker(1), signal.SIGKILL)
        assert job.wait()[0] == [0, 0], job.tails()
        assert "resuming from" in job.log(0)
    assert metrics(out) == metrics(two_nodes)


def test_a_node_missing_its_data_stops_both_with_its_line(config, node_config, tmp_path):
    dirs, out = node_dirs(tmp_path, config, missing_on_node1=("shards",)), tmp_path / "out"
    host = socket.gethostname()
    with Nodes(dirs, node_config, f"--out_dir={out}") as job:
        job.wait_until(lambda: job.errors(1), limit=120)
        codes, took = job.wait(60)
        assert codes == [1, 1] and took < 30, (codes, took, job.tails())
        mine, other = job.errors(1), job.errors(0)
        summary = job.log(1)
    assert mine == [f"error: rank 1 ({host}): {node_config}: input missing: data_dir shards (= {dirs[1] / 'shards'}): "
                    f"make it with python data.py prepare --input 'CORPUS/*.jsonl' --tokenizer tok.model --out shards"]
    assert other == [f"error: rank 0 ({host}): stopped by rank 1 ({host}): " + mine[0].split("): ", 1)[1]]
    assert "rank      : 1 (local_rank: 0)" in summary and f"traceback : {mine[0]}" in summary  # torchrun's summary
    assert not out.exists()


def test_a_problem_every_rank_of_a_node_finds_is_one_line(config, tmp_path):
    """Two processes on one node that both find the same problem (a batch that does not split over them): one
    line, rank 0's, not one per process; nothing written."""
    out = tmp_path / "out"
    proc = run(TORCHRUN, out, config, "--micro_batch_size=3", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and errors == [
        f"error: rank 0 ({socket.gethostname()}): batch_size 8 is not a multiple of 2 processes x micro_batch_size 3; "
        f"micro_batch_size can be 1, 2, 4"], proc.stderr[-3000:]
    assert not out.exists()


def test_a_node_local_out_dir_is_one_line_and_nothing_is_written(config, node_config, tmp_path):
    dirs = node_dirs(tmp_path, config)
    with Nodes(dirs, node_config, "--out_dir=out/run") as job:  # relative: each node its own
        assert job.wait()[0] == [1, 1], job.tails()
        mine = job.errors(1)
    assert len(mine) == 1 and mine[0].startswith(
        f"error: rank 1 ({socket.gethostname()}): out_dir out/run ({dirs[1] / 'out' / 'run'}) is not the directory "
        f"rank 0 writes to: "), mine
    for d in dirs:
        assert sorted(p.name for p in d.iterdir()) == ["launcher.log", "miracl.jsonl", "shards", "tok.model"]


def test_a_stuck_worker_ends_the_job_naming_the_step_and_the_silent_rank(config, node_config, tmp_path):
    # a 20 s timeout rather than the default 600 s or a 60 s one: what is checked does not depend on it, and the job
    # still needs another 30 s to end after the line (torchrun waits that long for a stopped worker to take
    # SIGTERM before it kills it). The process group's own timeout is ten times longer, as if NCCL's: gloo's
    # timed-out collective cannot speak first, the watchdog must (a little before 20 s, where NCCL would abort)
    dirs, out = node_dirs(tmp_path, config), tmp_path / "out"
    with Nodes(dirs, node_config, f"--out_dir={out}", "--collective_timeout=20",
               script=REPO / "tests" / "patient_collectives.py") as job:
        job.wait_until(lambda: logged_step(5)(out))
        os.kill(job.worker(1), signal.SIGSTOP)
        codes, took = job.wait(240)
        assert codes[0] == 1 and codes[1] not in (0, None) and took < 120, (codes, took, job.tails())
        lines = job.errors(0)
    host = re.escape(socket.gethostname())
    assert len(lines) == 1 and re.fullmatch(
        rf"error: rank 0 \({host}\): step (\d+) \(.+\): no progress for (\d+) s; "
        rf"not heard from: rank 1 \({host}, last heard \d+ s ago, at step \d+, .+\)", lines[0]), lines
    step, silent = map(int, re.search(r"step (\d+) .*no progress for (\d+) s", lines[0]).groups())
    assert step >= 5 and 18 <= silent <= 20, lines[0]  # the limit, 20 s less a tenth, checked every second


# ---- micro-batches by tokens on many processes ------------------------------------------------------------------


class Lengths:
    """A loader stand-in whose samples all have the same token count."""

    def __init__(self, tokens):
        self.tokens = tokens

    def sample_tokens(self, first, n):
        return [self.tokens] * n


def test_empty_share_counts_what_pack_by_tokens_leaves_empty():
    # every sample fills a micro-batch: 384 micro-batches on 128 ranks fit exactly, on 100 ranks 4 x 100 - 384
    assert data.empty_share(Lengths(100), 100, 128, 384, batches=2) == (0, 2 * 384)
    assert data.empty_share(Lengths(100), 100, 100, 384, batches=2) == (2 * 16, 2 * 400)
    # two samples per micro-batch: 192 micro-batches, 2 micro-steps on each of 128 ranks, 64 of them empty
    assert data.empty_share(Lengths(50), 100, 128, 384, batches=1) == (64, 256)


def test_more_than_a_quarter_empty_is_a_warning_with_what_to_change():
    assert data.micro_batch_report(Lengths(30), 384, 150, 30, 16) == (  # 77 micro-batches: 5 steps on 16 ranks, 3 empty
        "4% of the micro-batches of <= 150 tokens empty on 16 processes (the first 8 global batches)")
    # on 128 ranks 51 of the 77 + 51 are empty; 4 samples of 30 tokens per micro-batch would make 96 (25% empty)
    assert data.micro_batch_report(Lengths(30), 384, 150, 30, 128) == (
        "warning: 40% of the micro-batches of <= 150 tokens empty on 128 processes (the first 8 global batches): a "
        "global batch of 384 sequences fills about 77 micro-batches and each process runs 1; to fill them, lower "
        "micro_batch_tokens to 120 (25% empty), raise batch_size to about 639 or run on about 77 processes")


def test_stage2_batch_splits_over_128_processes_by_tokens(config):
    stage2, _ = train.load_config(["stage2"])
    assert stage2.batch_size == 384 and stage2.micro_batch_tokens and data.batch_split_problem(
        stage2.batch_size, stage2.micro_batch_size, 128, stage2.micro_batch_tokens, stage2.max_seqlen) is None
    assert data.batch_split_problem(384, 2, 128) == (
        "batch_size 384 is not a multiple of 128 processes x micro_batch_size 2; micro_batch_size can be 1, 3")
    # the same split on the demo shards, training and validation: every rank runs as many micro-steps
    cfg, _ = train.load_config([config, "--batch_size=384", "--micro_batch_tokens=96"])
    steps = set()
    for rank in (0, 1, 127):
        _, loader, val, _ = train.open_inputs(cfg, config, rank, 128)
        steps.add((len(next(iter(loader))), len(next(iter(val)))))
    assert len(steps) == 1, steps
    empty, total = data.empty_share(loader, 96, 128, 384)
    report = data.micro_batch_report(loader, cfg.batch_size, cfg.micro_batch_tokens, cfg.max_seqlen, 128)
    assert f"{empty / total:.0%} of the micro-batches of <= 96 tokens empty on 128 processes" in report
    assert report.startswith("warning: ") == (empty / total > data.EMPTY_WARNING), report


# ---- retention on a network filesystem --------------------------------------------------------------------------


def test_a_busy_file_never_fails_retention_and_goes_with_the_next_start(tmp_path, monkeypatch):
    old = tmp_path / "ckpt_3"
    old.mkdir()
    (old / "__0_0.distcp").write_bytes(b"x" * 10)
    (old / ".nfs0000busy").write_bytes(b"y")  # what NFS leaves for a file still open elsewhere
    unlink = os.unlink

    def busy(path, *args, **kwargs):
        if str(path).endswith(".nfs0000busy"):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", busy)
    checkpoint.discard(old)
    assert not old.exists() and checkpoint.list_checkpoints(tmp_path) == []
    left = list(tmp_path.glob("ckpt_3.trash-*"))
    assert len(left) == 1 and [p.name for p in left[0].iterdir()] == [".nfs0000busy"]
    monkeypatch.setattr(os, "unlink", unlink)  # the file was closed meanwhile
    checkpoint.remove_partial(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- checkpoints from elsewhere: data only ----------------------------------------------------------------------


def pickle_globals(raw):
    """(module, name) of every global a pickle names, read from its opcodes (protocols 0-5), not by loading it."""
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = strings[-1] if strings else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(arg))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        elif op.name in ("GLOBAL", "INST"):
            found.add(tuple(arg.split(" ", 1)))
    return found


def load_worker(ckpt, out):
    """Under torchrun: a checkpoint loaded into the sharded model and AdamW as a resume loads it; rank 0 saves the
    whole weights and optimizer state, gathered, and its own state."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    meta = checkpoint.verify(ckpt)
    model = ModernBERT(ModernBertConfig(**meta["model_config"]))
    parallelize(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = model.configure_optimizers(0.0, 1.0, (0.5, 0.6))  # what the checkpoint replaces
    own = checkpoint.load(ckpt, model, optimizer)
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"weights": weights, "optim": optim, "own": own}, out)
    dist.barrier()
    ranks.end()


def test_a_checkpoint_of_2_processes_loads_on_1_and_3(reference2, tmp_path):
    final = ModernBERT.from_pretrained(reference2 / "hf").state_dict()  # the same step, gathered and exported
    loaded = []
    for world in (1, 3):
        out = tmp_path / f"loaded{world}.pt"
        proc = subprocess.run([*TORCHRUN[:-1], f"--nproc_per_node={world}", __file__, "load",
                               str(reference2 / f"ckpt_{STEPS}"), str(out)], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded.append(torch.load(out, weights_only=False))
    for got in loaded:
        assert got["weights"].keys() == final.keys()
        assert all(torch.equal(got["weights"][k], final[k]) for k in final)
        assert got["optim"]["param_groups"][0]["betas"] == (0.9, 0.98)  # the run's, not the ones built here
    one, three = (got["optim"]["state"] for got in loaded)
    assert one.keys() == three.keys() and len(one) == len(final) - 1  # every parameter (the decoder's is tied)
    for name, state in one.items():
        assert state.keys() == {"step", "exp_avg", "exp_avg_sq"} and float(state["step"]) == STEPS
        assert all(torch.equal(v, three[name][k]) for k, v in state.items()) and state["exp_avg_sq"].abs().sum() > 0
    assert loaded[0]["own"]["loader"] == loaded[1]["own"]["loader"]  # rank 0's, written by 2 processes

def test_the_metadata_of_checkpoints_written_on_1_and_2_processes_is_admitted_whole(reference, reference2):
    for ckpt in (reference / "ckpt_12", reference2 / "ckpt_12"):
        raw = (ckpt / ".metadata").read_bytes()
        named = pickle_globals(raw)
        assert ("torch.distributed.checkpoint.metadata", "Metadata") in named and ("torch", "float32") in named
        assert named <= checkpoint.METADATA_GLOBALS, named - checkpoint.METADATA_GLOBALS
        assert checkpoint.read_dcp_metadata(ckpt) == pickle.loads(raw)  # the same metadata as dcp's own reader


class Touch:
    """Pickled as a call of os.system that creates a file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Then:
    """Pickled as: run `first`, then return `value` (what a tampered .metadata does to pass unnoticed)."""
    def __init__(self, first, value):
        self.first, self.value = first, value

    def __reduce__(self):
        return operator.getitem, ((self.first, self.value), 1)


def plant(ckpt, how, marker):
    """Replace ckpt's .metadata with a pickle that creates `marker`, by os.system and then returning the real metadata
    (how="file") or by importing a module placed beside it (how="import"), and record its size and CRC-32 in
    meta.json, as anyone who can write the directory can. -> PYTHONPATH under which the pickle does its work."""
    file = ckpt / ".metadata"
    real = pickle.loads(file.read_bytes())
    if how == "file":
        file.write_bytes(pickle.dumps(Then(Touch(marker), real)))
    else:
        (marker.parent / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\nvalue = None\n")
        file.write_bytes(b"cplanted\nvalue\n.")  # a global of a module: loading it imports the module
    meta = json.loads((ckpt / "meta.json").read_text())
    raw = file.read_bytes()
    meta["files"][".metadata"] = {"size": len(raw), "crc32": f"{zlib.crc32(raw):08x}"}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    env = {**ENV, "PYTHONPATH": str(marker.parent)}
    # the planted pickle does what it is made for when loaded as dcp would
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(file)!r}, 'rb'))"], env=env,
                   capture_output=True, check=False)
    assert marker.exists(), how
    marker.unlink()
    return env


def refused(proc, ckpt):
    """One process stopped with exit status 1 and only one line, naming the .metadata and what it loads."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    assert f"{ckpt / '.metadata'}: refused " in proc.stderr and "nothing of this checkpoint is used" in proc.stderr
    return proc.stderr.strip()


def torchrun(log_dir, *args, env=ENV, timeout=300):
    """train.py (or what args name) under torchrun with 2 processes, each one's stderr to a file of its own, since
    their lines may interleave on one pipe. -> (the process, {rank: the error lines it printed})."""
    proc = subprocess.run([*TORCHRUN, f"--log-dir={log_dir}", "--redirects=2", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    errors = {int(f.parent.name): [line for line in f.read_text().splitlines() if line.startswith("error: ")]
              for f in Path(log_dir).glob("*/attempt_0/*/stderr.log")}
    return proc, errors


@pytest.mark.parametrize("how", ["file", "import"])
def test_a_checkpoint_that_would_run_code_is_refused_wherever_it_is_read(config, reference, tmp_path, how):
    marker = tmp_path / "ran"
    out = rewind(reference, tmp_path / "out", step=9)
    env = plant(out / "ckpt_9", how, marker)
    what = "_operator.getitem" if how == "file" else "planted.value"

    def cli(*args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    resumed = cli("train.py", config, f"--out_dir={out}")
    initialised = cli("train.py", config, f"--out_dir={tmp_path / 'other'}", f"--init_from={out / 'ckpt_9'}")
    exported = cli("train.py", "--export", out / "ckpt_9", tmp_path / "hf")
    evaluated = cli("evaluate.py", "--task", "fillmask", "--model", out / "ckpt_9", "--out", tmp_path / "eval")
    for proc in (resumed, initialised, exported, evaluated):
        assert f"refused {what}," in refused(proc, out / "ckpt_9")
    assert initialised.stderr.startswith(f"error: init_from {out / 'ckpt_9' / '.metadata'}: refused")
    assert evaluated.stderr.startswith(f"error: --model {out / 'ckpt_9'}: {out / 'ckpt_9' / '.metadata'}: refused")
    assert not marker.exists() and not (tmp_path / "hf").exists() and not (tmp_path / "eval").exists()
    assert metrics(out) == metrics(reference)[:len(metrics(out))] and len(metrics(out)) > 0  # nothing trimmed


def test_two_processes_refuse_it_on_each_rank(config, reference2, tmp_path):
    marker = tmp_path / "ran"
    out = rewind(reference2, tmp_path / "out", step=9)
    env = plant(out / "ckpt_9", "file", marker)
    refusal = f"{out / 'ckpt_9' / '.metadata'}: refused _operator.getitem, not a type checkpoint metadata is made " \
              f"of (loading it could run code); nothing of this checkpoint is used"
    proc, errors = torchrun(tmp_path / "resumed", "train.py", config, f"--out_dir={out}", env=env)
    assert proc.returncode == 1 and not marker.exists(), proc.stderr[-3000:]
    assert {r: [line.split("): ", 1)[1] for line in lines] for r, lines in errors.items()} == {0: [refusal],
                                                                                                 1: [refusal]}
    assert (out / "log.txt").read_text().endswith(f"{refusal}\n")
    proc, errors = torchrun(tmp_path / "initialised", "train.py", config, f"--out_dir={tmp_path / 'other'}",
                            f"--init_from={out / 'ckpt_9'}", env=env)
    assert proc.returncode == 1 and not marker.exists(), proc.stderr[-3000:]
    # the ranks agree on the problem before going on, and the lowest rank of the host that has it says it
    assert errors[1] == [] and len(errors[0]) == 1 and errors[0][0].endswith(f"): init_from {refusal}")


def test_optimizer_values_are_read_as_data_only(tmp_path):
    """dcp stores a state's non-tensor values as pickles in the data files; one that would run code is refused."""
    marker = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: one process, as intended
        dcp.save({"w": torch.ones(3), "lr": Then(Touch(marker), 0.1)}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
        plain = {"w": torch.zeros(3), "lr": None}
        dcp.load(plain, checkpoint_id=tmp_path / "ckpt", no_dist=True)  # dcp's own planner runs it
        assert marker.exists() and plain["lr"] == 0.1
        marker.unlink()
        state = {"w": torch.zeros(3), "lr": None}
        with pytest.raises(checkpoint.Problem, match=r"ckpt: refused the value of lr: it loads "
                           r"_operator\.getitem, not plain data \(loading it could run code\); nothing of this "
                           r"checkpoint is used$"):
            checkpoint._dcp_load(state, tmp_path / "ckpt", no_dist=True)
        assert not marker.exists()
        dcp.save({"w": torch.ones(3), "lr": 0.1, "betas": (0.9, 0.98)}, checkpoint_id=tmp_path / "good", no_dist=True)
        state = {"w": torch.zeros(3), "lr": None, "betas": None}
        checkpoint._dcp_load(state, tmp_path / "good", no_dist=True)
    assert torch.equal(state["w"], torch.ones(3)) and (state["lr"], state["betas"]) == (0.1, (0.9, 0.98))


def test_a_malformed_metadata_is_one_line(reference, tmp_path):
    ckpt = tmp_path / "ckpt_12"
    shutil.copytree(reference / "ckpt_12", ckpt)
    for raw, expected in ((b"", "unreadable (EOFError"), (pickle.dumps({"a": 1}), "holds a dict, not checkpoint "
                                                                                "metadata")):
        (ckpt / ".metadata").write_bytes(raw)
        with pytest.raises(checkpoint.Problem) as e:
            checkpoint.read_dcp_metadata(ckpt)
        assert str(e.value).startswith(f"{ckpt / '.metadata'}: {expected}"), str(e.value)
    metadata = pickle.loads((reference / "ckpt_12" / ".metadata").read_bytes())
    next(iter(metadata.storage_data.values())).relative_path = "../rank0.pt"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(checkpoint.Problem, match=r"names the data file '\.\./rank0\.pt', not a file of "):
        checkpoint.read_dcp_metadata(ckpt)


# ---- a full disk --------------------------------------------------------------------------------------------------


def small_disk(capacity, script, *args):
    """Run `script` as if its out_dir were a filesystem of `capacity` bytes: shutil.disk_usage says what is left of
    it, and a write by dcp that would pass it fails as on a full disk (OSError ENOSPC, inside torch.save)."""
    import runpy
    from torch.distributed.checkpoint.filesystem import FileSystem
    out_dir, capacity = Path(next(a for a in args if a.startswith("--out_dir=")).split("=", 1)[1]), int(capacity)

    def used():
        return sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.flush()
            if used() + len(b) > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    create, disk_usage = FileSystem.create_stream, shutil.disk_usage

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with create(self, path, mode) as f:
            yield Full(f) if "w" in mode else f

    def usage(path):
        if Path(path).resolve() != out_dir.resolve():
            return disk_usage(path)
        return disk_usage(path)._replace(total=capacity, used=used(), free=max(0, capacity - used()))
    FileSystem.create_stream, shutil.disk_usage = create_stream, usage
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def test_a_full_disk_is_one_line_on_every_rank_and_the_rerun_continues_the_curve(config, reference2, tmp_path):
    out, size = tmp_path / "out", checkpoint.checkpoint_size(reference2 / "ckpt_12")
    capacity = int(2.5 * size) + (64 << 10)  # two checkpoints and the logs, not a third

    def on_small_disk():
        proc, errors = torchrun(tmp_path / f"logs{len(list(tmp_path.glob('logs*')))}", "tests/test_train.py",
                                "small_disk", capacity, "train.py", config, f"--out_dir={out}")
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert sorted(errors) == [0, 1] and all(len(lines) == 1 for lines in errors.values()), errors
        for rank, (line,) in errors.items():  # the same cause on both, whether dcp's ENOSPC reached it or not
            assert re.search(rf"^error: rank {rank} \(.*\): step 9: could not save {out / 'ckpt_9'}: out of space "
                             rf"\(out_dir {out} has 0\.[0-9] MiB free, a checkpoint needs {size / 2**20:.1f} MiB\); "
                             rf"the last good checkpoint is {out / 'ckpt_6'}: free space or lower keep_last \(3 now\), "
                             rf"then rerun to resume from it$", line), line
        log = (out / "log.txt").read_text()
        assert log.endswith(errors[0][0] + "\n")
        assert [p.name for p in sorted(out.iterdir()) if p.name.startswith("ckpt_")] == ["ckpt_3", "ckpt_6"]
        return proc, log
    proc, log = on_small_disk()
    assert log.count("error: ") == 1 and f"warning: out_dir {out} has" in log  # from the model, before the first
    assert f"warning: step 9: out_dir {out} has 0." in log  # the comparison before each save
    proc, log = on_small_disk()  # resumed at step 6, and warned at once that it cannot last
    assert f"warning: out_dir {out} has 0.6 MiB free and {2 * size / 2**20:.1f} MiB in checkpoints, but the 4 " \
        f"checkpoints a run holds while saving (keep_last 3 + 1) need {4 * size / 2**20:.1f} MiB, " \
        f"{size / 2**20:.1f} MiB each: saving will fail; free space or lower keep_last\n" in proc.stdout
    rerun = run(TORCHRUN, out, config)  # room again
    assert f"resuming from {out / 'ckpt_6'} at step 6" in rerun.stdout and "warning" not in rerun.stdout
    assert metrics(out) == metrics(reference2)


def test_the_errno_of_a_failed_write_is_found_through_dcp_and_torch_save():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x/__0_0.distcp")
    zip_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    zip_writer.__context__ = full  # what torch.save into a file object that raised leaves
    failed = dcp.api.CheckpointException("save", {1: (zip_writer, None)})
    assert checkpoint._cause(failed) == (errno.ENOSPC, "No space left on device: x/__0_0.distcp")
    assert checkpoint._cause(RuntimeError("a\nb")) == (None, "a")
    failed = dcp.api.CheckpointException("save", {0: (RuntimeError("unexpected pos 704 vs 598"), None)})
    assert checkpoint._cause(failed) == (None, "RuntimeError: unexpected pos 704 vs 598")  # not its rank list


def test_the_start_warning_counts_the_checkpoints_there(tmp_path, monkeypatch):
    model = ModernBERT(ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2))
    weights = sum(p.numel() for p in model.parameters()) * 4
    ckpt = tmp_path / "ckpt_3"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1, "config": {}, "model_config": {},
                                                "files": {"a": {"size": 1000, "crc32": "0"}}}))
    size = 1000 + (ckpt / "meta.json").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    for free, warned in ((2 * size - 1, True), (2 * size, False)):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
        warning = checkpoint.space_warning(tmp_path, 2, model)  # 3 of `size` needed, one of them there
        assert bool(warning) == warned, (free, warning)
    (ckpt / "meta.json").unlink()  # before the first: the weights (the decoder's tied to the embedding's, written
    # twice) and AdamW's two moments
    estimate = 3 * weights + model.model.embeddings.tok_embeddings.weight.numel() * 4
    for free, warned in ((3 * estimate - 1, True), (3 * estimate, False)):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
        assert bool(checkpoint.space_warning(tmp_path, 2, model)) == warned, free
    assert checkpoint.space_warning(tmp_path, 2, model, step=5) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3 * weights - 1))
    assert checkpoint.space_warning(tmp_path, 2, model, step=5).startswith(f"warning: step 5: out_dir {tmp_path} has ")


if __name__ == "__main__":
    if sys.argv[1] == "late_release":
        kept = late_release_worker()
    elif sys.argv[1] == "retrieval":
        retrieval_worker(*sys.argv[2:])
    elif sys.argv[1] == "latest":
        latest_worker(*sys.argv[2:])
    elif sys.argv[1] == "load":
        load_worker(*sys.argv[2:])
    elif sys.argv[1] == "small_disk":
        small_disk(*sys.argv[2:])
    else:
        gradient_worker(sys.argv[1])
