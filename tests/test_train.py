"""train.py end to end on a very small model: config checking, exact resume after SIGKILL (1 and 2 processes),
interrupted checkpoint writes, 1 vs 2 process agreement, NaN detection, export."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import demo
import train
from model import ModernBERT

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # deterministic and fast on a shared CPU
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMPARED = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss", "val_acc", "recall@10", "mrr@10")
STEPS = 8


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
log_every = 1
checkpoint_every = 3
keep_last = 2
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


def run_and_kill(cmd, out_dir, config, at_step):
    """Start a run, SIGKILL all its processes once metrics.jsonl reaches at_step; the lines it wrote."""
    proc = subprocess.Popen([*cmd, "train.py", str(config), f"--out_dir={out_dir}"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = Path(out_dir) / "metrics.jsonl", time.time() + 300
    try:
        while not (path.exists() and any(m.get("step", 0) >= at_step and "loss" in m for m in metrics(out_dir))):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
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


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref1") / "out"
    run([sys.executable], out, config)
    return out


def check_resume(cmd, config, reference, out, at_step):
    expected = metrics(reference)
    killed = run_and_kill(cmd, out, config, at_step)
    assert killed == expected[:len(killed)]
    # a checkpoint whose writing was cut short: no meta.json, a truncated shard file
    complete = train.checkpoints(out)
    assert complete, "the killed run had written no checkpoint"
    step = int(complete[-1].name.split("_")[1])
    partial = out / f"ckpt_{step + 1}.tmp"
    shutil.copytree(complete[-1], partial)
    (partial / "meta.json").unlink()
    shard = next(partial.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert train.checkpoints(out) == complete
    with open(out / "metrics.jsonl", "a") as f:  # and a metrics line cut short
        f.write('{"step": 99, "lo')
    proc = run(cmd, out, config)
    assert f"resuming from {complete[-1]} at step {step}" in proc.stdout
    assert not partial.exists()
    assert metrics(out) == expected  # every step, bit for bit, and nothing twice
    return proc


def test_resume_after_kill_one_process(config, reference, tmp_path):
    assert [m["step"] for m in metrics(reference) if "loss" in m] == list(range(1, STEPS + 1))
    check_resume([sys.executable], config, reference, tmp_path / "out", at_step=5)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert log.startswith("# ") and "# commit " in log and f"max_steps = {STEPS}" in log and "torch " in log
    assert sorted(p.name for p in (tmp_path / "out").glob("ckpt_*")) == ["ckpt_6", "ckpt_8"]  # keep_last = 2


def test_two_processes_match_one_and_resume_exactly(config, reference, tmp_path):
    ref2 = tmp_path / "ref2"
    run(TORCHRUN, ref2, config)
    one, two = metrics(reference), metrics(ref2)
    assert [sorted(m) for m in one] == [sorted(m) for m in two]
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a.get("tokens") == b.get("tokens")
        # before the first update only the order of fp32 sums differs; after it, Adam's normalised steps
        # let that noise grow a little from step to step
        rel = 1e-5 if a["step"] <= 1 else 1e-3
        for key in ("loss", "grad_norm", "val_loss", "val_acc", "recall@10"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    check_resume(TORCHRUN, config, ref2, tmp_path / "killed", at_step=4)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(config, tmp_path):
    out = tmp_path / "out"
    proc = run([sys.executable], out, config, "--lr=1e30", "--warmup_steps=1", "--checkpoint_every=1", check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: step ") and ("nan" in message or "inf" in message), message
    failed = int(message.split()[2].rstrip(":"))
    saved = train.checkpoints(out)
    assert saved and saved[-1].name == f"ckpt_{failed - 1}"
    assert not list(out.glob("ckpt_*.tmp"))
    exported = subprocess.run([sys.executable, "train.py", "--export", str(saved[-1]), str(tmp_path / "hf")],
                              cwd=REPO, env=ENV, capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    ModernBERT.from_pretrained(tmp_path / "hf")


def test_export_matches_final_weights(reference, tmp_path):
    ckpt = train.checkpoints(reference)[-1]
    assert ckpt.name == f"ckpt_{STEPS}"
    proc = subprocess.run([sys.executable, "train.py", "--export", str(ckpt)], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a = ModernBERT.from_pretrained(reference / "hf").state_dict()
    b = ModernBERT.from_pretrained(reference / f"hf_{STEPS}").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / "hf" / "tokenizer.model").is_file()
    assert json.loads((reference / "hf" / "training.json").read_text())["step"] == STEPS


# ---- configuration ----------------------------------------------------------------------------------------


def config_error(capsys, *args):
    with pytest.raises(SystemExit) as e:
        train.load_config([str(a) for a in args])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


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
