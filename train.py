"""
Pretrain a ModernBERT encoder with masked language modelling, on one process or many (FSDP2).

    python train.py configs/demo.py                          # CPU or one GPU
    python train.py configs/demo.py --max_steps=100 --lr=1e-3
    torchrun --nproc_per_node=8 train.py configs/stage1.py   # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py stage1
    python train.py --export out/stage1/ckpt_20000 [DIR]     # any checkpoint -> Hugging Face format
    python train.py --help                                   # every setting, its default and meaning

A config file holds `name = value` lines that override the defaults in `Config` below, and `--name=value`
arguments override the file. Unknown names and wrong types stop the run. A config path that does not exist
is looked up by file name in configs/ (`train.py stage2` runs configs/stage2.py).

out_dir receives log.txt (the resolved config, commit and versions, then progress), metrics.jsonl (one JSON
line per logged step and per evaluation; with a mixture of corpora, each one's tokens and epochs so far),
checkpoints ckpt_STEP/ (the last `keep_last`) and, at the end, the model in hf/, a directory that transformers
(model, tokenizer, pipelines) and sentence-transformers open (checkpoint.export_hf lists its files). Running the
same command again resumes from the newest checkpoint that verifies (checkpoint.py): the same batches, masks and
losses as an uninterrupted run, on any number of processes. `resume_from` continues another run's checkpoint in
this out_dir the same way (until this run has checkpoints of its own): with `schedule = "wsd"` (warmup, lr held,
a decay over the last decay_steps), a decay branched from any checkpoint of the stable phase, or the run extended.
`--export` writes a checkpoint in the same format, to DIR or to out_dir/hf_STEP (`--unnormalized`: the
sentence-transformers embeddings without the final L2 normalisation).

On several processes and nodes, `main` runs four phases: setup (every rank checks the config and its inputs,
then the ranks agree; out_dir must be one directory that every rank sees), resume, the loop, finish. A problem
on any rank stops the whole job with one line from that rank, `error: rank R (HOST): ...`, which torchrun's
summary repeats. A watchdog ends a job that stops making progress (a dead, stuck or unreachable rank) after
`collective_timeout` seconds with a line naming the step and the ranks not heard from. That machinery lives in
ranks.py; this file keeps the settings, the phases and the loop.
"""
import ast
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import checkpoint
import data
import demo
import ranks
from model import (IGNORE_INDEX, PRESETS, ModernBERT, ModernBertConfig, by_budget, cpu_threads, embed, gpu_peak_flops,
                   parallelize, recall_mrr)
from ranks import Problem

REPO = Path(__file__).resolve().parent


@dataclass
class Config:
    # run
    out_dir: str = "out/run"     # log.txt, metrics.jsonl, checkpoints and the final hf/ export; rerun to resume
    seed: int = 0                # model init, data order and masking
    max_steps: int = 1000        # optimizer steps
    log_every: int = 10          # steps between metrics.jsonl lines (the first and last step are always logged)
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 2           # checkpoints kept in out_dir
    eval_every: int = 1000       # steps between evaluations (and one at the end); 0 = never
    # model: a ModernBertConfig preset plus overrides; vocab size and special ids come from the tokenizer
    model: str = "llm-jp-modernbert-base"  # preset in model.py: llm-jp-modernbert-base, tiny, ...
    model_args: dict = field(default_factory=dict)  # ModernBertConfig overrides, e.g. dict(num_hidden_layers=6)
    init_from: str = ""          # start from these weights (a checkpoint dir or a Hugging Face dir), fresh optimizer
    resume_from: str = ""        # continue another run's checkpoint dir (weights, optimizer, step, data) in out_dir
    # data (data.py): shards prepared from a jsonl corpus with `tokenizer`
    data_dir: str = "data/demo/shards"  # shard directory written by python data.py prepare, or a mixture of
    # several, {shard_dir: weight, ...}: each corpus's share of the tokens follows its weight
    tokenizer: str = "data/demo/tokenizer.model"  # sentencepiece model the shards were made with
    demo_data: bool = False      # if data_dir is missing, build the demo corpus, tokenizer and shards in its parent
    mode: str = "line_by_line"   # one document per sequence, truncated; or "packed" into max_seqlen rows
    max_seqlen: int = 1024       # tokens per sequence, <CLS> and <SEP> included
    batch_size: int = 64         # global sequences (packed mode: rows of max_seqlen tokens) per optimizer step
    batch_size_start: int = 0    # > 0: the global batch grows from this to batch_size (in multiples of it) ...
    batch_warmup_tokens: int = 0  # ... over the first this many tokens (0: batch_size from the start)
    micro_batch_size: int = 16   # sequences per process per forward/backward, unless micro_batch_tokens is set
    micro_batch_tokens: int = 0  # > 0: micro-batches of at most this many tokens instead (>= max_seqlen)
    mlm_probability: float = 0.3  # share of tokens masked (80% <MASK>, 10% random, 10% kept)
    # evaluation
    eval_batches: int = 10       # validation batches (of batch_size sequences) for MLM loss and accuracy
    retrieval_eval: str = ""     # MIRACL-layout jsonl for zero-shot Recall@10 / MRR@10; "" = skip
    retrieval_max_len: int = 512  # tokens per text in the retrieval evaluation
    # optimizer: AdamW, linear warmup to lr, then linear decay to 0 at max_steps (or warmup-stable-decay)
    lr: float = 5e-4             # peak learning rate
    warmup_steps: int = 100      # steps of linear warmup from 0 to lr
    schedule: str = "linear"     # after the warmup: "linear" decay to 0 at max_steps, or "wsd": lr held, then decayed
    decay_steps: int = 0         # wsd: the last steps of max_steps, which decay from lr (0: lr held to the end)
    decay_shape: str = "linear"  # wsd: the decay's shape, "linear", "1-sqrt" or "cosine"
    min_lr_ratio: float = 0.0    # wsd: the decay ends at min_lr_ratio x lr
    betas: tuple = (0.9, 0.98)   # AdamW betas
    eps: float = 1e-6            # AdamW epsilon
    weight_decay: float = 1e-5   # on the linear layers' weight matrices only
    grad_clip: float = 1.0       # maximum global gradient norm
    # system
    dtype: str = "auto"          # compute dtype: "auto" = bfloat16 on CUDA, float32 on CPU; weights stay fp32
    compile: bool = False        # torch.compile the MLPs, embeddings and MLM head
    activation_checkpointing: bool = False  # recompute each layer in backward (long sequences)
    collective_timeout: int = 600  # seconds without progress (a rank dead or stuck) before the job stops, naming it
    wandb: bool = False          # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "llm-jp-modernbert"  # Weights & Biases project


CHOICES = {"mode": ("line_by_line", "packed"), "dtype": ("auto", "float32", "bfloat16"), "schedule": ("linear", "wsd"),
           "decay_shape": ("linear", "1-sqrt", "cosine")}
POSITIVE = ("max_steps", "log_every", "checkpoint_every", "keep_last", "batch_size", "micro_batch_size", "max_seqlen",
            "collective_timeout")
DTYPES = {"auto": lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
          "float32": lambda device: torch.float32, "bfloat16": lambda device: torch.bfloat16}


# -----------------------------------------------------------------------------------------------------------
# config


def find_config(arg):
    path = Path(arg)
    if path.is_file():
        return path
    for name in (path.name, path.name + ".py"):
        if (REPO / "configs" / name).is_file():
            return REPO / "configs" / name
    raise Problem(f"config {arg}: no such file, nor configs/{path.name}")


def set_key(cfg, key, value, where):
    types = {f.name: f.type for f in fields(Config)}
    if key not in types:
        raise Problem(f"{where}: unknown config key {key!r}")
    want = types[key]
    if want is float and type(value) is int:
        value = float(value)
    if key == "data_dir" and type(value) is dict:  # a mixture
        for d, w in value.items():
            if type(d) is not str:
                raise Problem(f"{where}: config key 'data_dir': a mixture's shard directories are strings, got "
                              f"{type(d).__name__} {d!r}")
            if type(w) not in (int, float) or not w > 0:
                raise Problem(f"{where}: config key 'data_dir': the weight of {d} must be a number above 0, got {w!r}")
        if not value:
            raise Problem(f"{where}: config key 'data_dir': a mixture names no shard directory")
    elif type(value) is not want:
        raise Problem(f"{where}: config key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise Problem(f"{where}: config key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value < 1:
        raise Problem(f"{where}: config key {key!r} must be at least 1, got {value}")
    setattr(cfg, key, value)


def load_config(args):
    """Defaults <- config file <- --key=value arguments, each checked."""
    cfg = Config()
    path = find_config(args[0])
    source = path.read_text()
    try:
        lines = {t.id: node.lineno for node in ast.parse(source).body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
        namespace = {}
        exec(compile(source, str(path), "exec"), namespace)
    except SyntaxError as e:
        raise Problem(f"{path}:{e.lineno}: {e.msg}")
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if f.filename == str(path)), "?")
        raise Problem(f"{path}:{line}: {type(e).__name__}: {e}")
    for key, value in namespace.items():
        if not key.startswith("__"):
            set_key(cfg, key, value, f"{path}:{lines.get(key, '?')}")
    for arg in args[1:]:
        match = re.fullmatch(r"--(\w+)=(.*)", arg, re.S)
        if not match:
            raise Problem(f"command line: {arg!r} is not --key=value")
        key, raw = match.groups()
        want = {f.name: f.type for f in fields(Config)}.get(key)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string
        if want is str and not isinstance(value, str) and not (key == "data_dir" and isinstance(value, dict)):
            value = raw  # --out_dir=123 means the string "123"
        set_key(cfg, key, value, "command line")
    known = {f.name for f in fields(ModernBertConfig)}
    for key in cfg.model_args:
        if key not in known:
            raise Problem(f"config key model_args: {key!r} is not a ModernBertConfig field")
        if key in FROM_TOKENIZER:
            raise Problem(f"config key model_args: {key!r} comes from the tokenizer, not the config")
    if cfg.model not in PRESETS:
        raise Problem(f"config key model: unknown preset {cfg.model!r} (known: {', '.join(PRESETS)})")
    try:
        ModernBertConfig.preset(cfg.model, **cfg.model_args)
    except (ValueError, TypeError, AssertionError) as e:
        raise Problem(f"config key model_args: {e}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise Problem(f"config key min_lr_ratio must be between 0 and 1, got {cfg.min_lr_ratio}")
    if cfg.decay_steps < 0:
        raise Problem(f"config key decay_steps must be at least 0, got {cfg.decay_steps}")
    if cfg.schedule == "linear" and (cfg.decay_steps, cfg.decay_shape, cfg.min_lr_ratio) != (0, "linear", 0.0):
        raise Problem("config keys decay_steps, decay_shape and min_lr_ratio shape schedule 'wsd' only, and schedule "
                      "is 'linear' (it decays to 0 over all the steps after the warmup)")
    if cfg.schedule == "wsd" and cfg.warmup_steps + cfg.decay_steps > cfg.max_steps:
        raise Problem(f"config key decay_steps: {cfg.decay_steps} decay steps after {cfg.warmup_steps} warmup steps "
                      f"do not fit in max_steps {cfg.max_steps}")
    if cfg.batch_warmup_tokens < 0:
        raise Problem(f"config key batch_warmup_tokens must be at least 0, got {cfg.batch_warmup_tokens}")
    if bool(cfg.batch_size_start) != bool(cfg.batch_warmup_tokens):
        raise Problem("config keys batch_size_start and batch_warmup_tokens: give both (a batch-size warmup) or "
                      "neither")
    if cfg.batch_warmup_tokens and not 0 < cfg.batch_size_start <= cfg.batch_size:
        raise Problem(f"config key batch_size_start must be between 1 and batch_size {cfg.batch_size}, got "
                      f"{cfg.batch_size_start}")
    if cfg.demo_data and isinstance(cfg.data_dir, dict):
        raise Problem("config keys demo_data and data_dir: the demo data is one corpus, data_dir a mixture")
    if cfg.init_from and cfg.resume_from:
        raise Problem("config keys init_from and resume_from: give one (init_from: weights only; resume_from: a "
                      "checkpoint's full state)")
    return cfg, path


FROM_TOKENIZER = {"vocab_size": "vocab_size", "pad_token_id": "pad_id", "cls_token_id": "cls_id",
                  "sep_token_id": "sep_id", "mask_token_id": "mask_id"}


def model_config(cfg, tokenizer):
    """The architecture: preset + model_args, with the vocabulary size and special ids of the tokenizer."""
    ids = {key: getattr(tokenizer, attr) for key, attr in FROM_TOKENIZER.items()}
    return ModernBertConfig.preset(cfg.model, **cfg.model_args, **ids)


# -----------------------------------------------------------------------------------------------------------
# inputs


def missing_inputs(cfg):
    """Every input file or directory the config names that is not there, each with how to make it."""
    missing = []
    if not (cfg.demo_data and not Path(cfg.data_dir).exists()):  # otherwise the demo data is built below
        for d in data_dirs(cfg):
            if not Path(d).is_dir():
                missing.append(f"data_dir {located(d)}: make it with python data.py prepare --input "
                               f"'CORPUS/*.jsonl' --tokenizer {cfg.tokenizer} --out {d}")
        if not Path(cfg.tokenizer).is_file():
            missing.append(f"tokenizer {located(cfg.tokenizer)}: put the llm-jp tokenizer there, or train one with "
                           f"python data.py tokenizer --input CORPUS.jsonl --vocab_size 100000 --out {cfg.tokenizer}")
        if cfg.retrieval_eval and not Path(cfg.retrieval_eval).is_file():
            missing.append(f"retrieval_eval {located(cfg.retrieval_eval)}: put MIRACL ja (train split, jsonl) there, "
                           f"or skip that evaluation with --retrieval_eval=''")
    if (cfg.resume_from and not (Path(cfg.resume_from) / checkpoint.META).is_file()
            and not checkpoint.list_checkpoints(cfg.out_dir)):  # with checkpoints of its own, a run resumes from them
        missing.append(f"resume_from {located(cfg.resume_from)}: not a checkpoint (no {checkpoint.META}); name a "
                       f"ckpt_STEP directory of another run")
    if cfg.init_from and not Path(cfg.init_from).exists():
        writes = re.compile(rf"^out_dir\s*=\s*[\"']{re.escape(str(Path(cfg.init_from).parent))}[\"']", re.M)
        makers = [p for p in sorted((REPO / "configs").glob("*.py")) if writes.search(p.read_text())]
        how = (f"python train.py {makers[0].relative_to(REPO)}" if makers and Path(cfg.init_from).name == "hf"
               else "the final export (OUT_DIR/hf) of a training run, or a Hugging Face ModernBERT directory")
        missing.append(f"init_from {located(cfg.init_from)}: make it with {how}")
    return missing


def data_dirs(cfg):
    """The shard directories data_dir names: one, or a mixture's."""
    return list(cfg.data_dir) if isinstance(cfg.data_dir, dict) else [cfg.data_dir]


def located(path):
    """A relative path with where it points from here (each node has its own working directory)."""
    return path if Path(path).is_absolute() else f"{path} (= {Path(path).absolute()})"


def check_inputs(cfg, config_path, world):
    """The first problem of these settings on `world` processes, or None: every missing input at once (each with how
    to make it), then what this machine lacks, then the batch split."""
    missing = missing_inputs(cfg)
    if len(missing) == 1:
        return f"{config_path}: input missing: {missing[0]}"
    if missing:
        return f"{config_path}: {len(missing)} inputs missing:\n  " + "\n  ".join(missing)
    if (os.environ.get("MODERNBERT_ATTENTION") == "kernels" and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        return "MODERNBERT_ATTENTION=kernels needs a CUDA GPU, and none is visible (on a CPU: TRITON_INTERPRET=1)"
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        return "config key wandb: True, but the wandb package is not installed (pip install wandb)"
    if cfg.batch_warmup_tokens and (problem := data.batch_split_problem(
            cfg.batch_size_start, cfg.micro_batch_size, world, cfg.micro_batch_tokens, cfg.max_seqlen,
            "batch_size_start")):
        return problem
    return data.batch_split_problem(cfg.batch_size, cfg.micro_batch_size, world, cfg.micro_batch_tokens,
                                    cfg.max_seqlen)


def open_inputs(cfg, config_path, rank, world):
    """This rank's tokenizer, training and validation loaders and retrieval pairs; Problem naming the first one."""
    if problem := check_inputs(replace(cfg, demo_data=False), config_path, world):  # the demo data is built now
        raise Problem(problem)
    tokenizer = data.Tokenizer(cfg.tokenizer)
    common = dict(batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, max_seqlen=cfg.max_seqlen,
                  rank=rank, world_size=world, seed=cfg.seed, mode=cfg.mode, mlm_probability=cfg.mlm_probability,
                  verify=False, tokenizer=tokenizer, micro_batch_tokens=cfg.micro_batch_tokens)
    warmup = dict(batch_size_start=cfg.batch_size_start, batch_warmup_tokens=cfg.batch_warmup_tokens)
    if isinstance(cfg.data_dir, dict):  # validation batches are drawn as training ones are, from the start each time
        loaders = [data.Mixture(cfg.data_dir, split="train", **common, **warmup),
                   data.Mixture(cfg.data_dir, split="val", **common)]
    else:
        loaders = [data.Loader(cfg.data_dir, split="train", **common, **warmup),
                   data.Loader(cfg.data_dir, split="val", shuffle=False, **common)]
    pairs = data.read_miracl_pairs(cfg.retrieval_eval) if cfg.retrieval_eval else []
    return tokenizer, *loaders, pairs


# -----------------------------------------------------------------------------------------------------------
# evaluation, shared over the ranks


@torch.no_grad()
def evaluate_mlm(run, model, step):
    """Masked-token loss and accuracy on the validation split (the same batches and masks every time)."""
    loader, device = run.val_loader, run.device
    loader.load_state_dict(run.val_start)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, masked tokens
    for _, micro_batches in zip(range(run.cfg.eval_batches), loader):
        # the split's last batch may give some ranks fewer micro-batches; they run empty ones, because every
        # rank must take part in every sharded forward
        most = torch.tensor(len(micro_batches), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for mb in micro_batches + [loader.empty_micro_batch()] * (int(most) - len(micro_batches)):
            run.at(step, "evaluation")
            labels = mb["labels"].to(device)
            logits, loss = model(mb["input_ids"].to(device), labels=labels, cu_seqlens=mb["cu_seqlens"].to(device),
                                 max_seqlen=mb["max_seqlen"])
            target = labels[labels != IGNORE_INDEX]
            totals += torch.stack([loss.double() * len(target), (logits.argmax(-1) == target).sum().double(),
                                   torch.tensor(len(target), dtype=torch.float64, device=device)])
    dist.all_reduce(totals)
    return {"val_loss": (totals[0] / totals[2]).item(), "val_acc": (totals[1] / totals[2]).item()}


@torch.no_grad()
def evaluate_retrieval(run, model, step):
    """Zero-shot Recall@10 and MRR@10 as evaluate.retrieval_scores computes them (model.embed, model.recall_mrr),
    with the texts shared over the ranks: batches of at most a micro-batch's tokens, planned alike on every rank
    (longest texts first), dealt round-robin, as many to each rank (an empty text fills up: every rank takes part in every sharded forward);
    rank 0 gathers the embeddings and scores. -> the scores on rank 0, None elsewhere."""
    cfg, rank, world = run.cfg, run.rank, run.world
    texts = [q for q, _ in run.pairs] + [p for _, p in run.pairs]
    lengths = [len(run.tokenizer.encode_pair(t, max_len=cfg.retrieval_max_len)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    budget = cfg.micro_batch_tokens or cfg.micro_batch_size * cfg.max_seqlen
    batches = [[order[i] for i in group] for group in by_budget([lengths[i] for i in order], budget)]
    mine = batches[rank::world]
    part = {}
    for group in mine + [[]] * (-(-len(batches) // world) - len(mine)):
        run.at(step, "evaluation")
        part.update(zip(group, embed(model, run.tokenizer, [texts[i] for i in group] or [""], cfg.retrieval_max_len,
                                     budget)))
    parts = [None] * world if rank == 0 else None
    dist.gather_object(part, parts)
    if rank:
        return None
    found = {i: e for p in parts for i, e in p.items()}
    e = torch.stack([found[i] for i in range(len(texts))])  # (queries + passages, hidden)
    recall, mrr = recall_mrr(e[:len(run.pairs)] @ e[len(run.pairs):].T)
    return {"recall@10": recall, "mrr@10": mrr}


# -----------------------------------------------------------------------------------------------------------
# helpers


def git_commit():
    """HEAD, with "-dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        head = git("rev-parse", "--verify", "--quiet", "HEAD")
        if head.returncode:
            return "unknown"
        return head.stdout.strip() + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")
    except OSError:
        return "unknown"


def lr_at(cfg, step):
    """The learning rate of the update that makes step + 1. Warmup: the first update already moves, the last one of
    the warmup is at lr. "linear": then down to 0 at max_steps. "wsd": lr held, then the decay's steps go down from
    it, the last one (the run's) at min_lr_ratio x lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))
    done = step + 1 - (cfg.max_steps - cfg.decay_steps)  # decay steps taken, this one included
    if done <= 0:
        return cfg.lr
    p = min(1.0, done / cfg.decay_steps)
    left = {"linear": 1 - p, "1-sqrt": 1 - math.sqrt(p), "cosine": (1 + math.cos(math.pi * p)) / 2}[cfg.decay_shape]
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * left)


SCHEDULE = ("max_steps", "decay_steps", "decay_shape", "min_lr_ratio")  # may change after the stable phase


def stable_so_far(old, new, step):
    """Whether the learning rates of the steps before `step` are the same under two settings because both are wsd and
    still hold lr there: then a run may be extended, or a decay branched, with SCHEDULE changed."""
    return (old.schedule == new.schedule == "wsd" and (old.lr, old.warmup_steps) == (new.lr, new.warmup_steps)
            and step <= min(old.max_steps - old.decay_steps, new.max_steps - new.decay_steps))


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def export(args):
    """python train.py --export CKPT_DIR [OUT_DIR] [--unnormalized]: one process, no GPU needed."""
    unnormalized = "--unnormalized" in args
    args = [a for a in args if a != "--unnormalized"]
    if not 1 <= len(args) <= 2 or any(a.startswith("--") for a in args):
        raise Problem("usage: python train.py --export CKPT_DIR [OUT_DIR] [--unnormalized]")
    ckpt = Path(args[0])
    meta = checkpoint.verify(ckpt)
    model = ModernBERT(ModernBertConfig(**meta["model_config"]))
    checkpoint.load_weights(model, ckpt)
    out = Path(args[1]) if len(args) == 2 else ckpt.parent / f"hf_{meta['step']}"
    missing = checkpoint.export_hf(model, out, meta["config"]["tokenizer"], meta, normalize=not unnormalized)
    print(f"exported {ckpt} (step {meta['step']}) to {out}")
    if missing:
        print(f"warning: {missing}: tokenizer not found, so {out} has no tokenizer files; copy the tokenizer there "
              f"and export again", file=sys.stderr)


def usage():
    """--help: every setting with its default and meaning, read from the comments of Config."""
    print(__doc__.strip() + "\n\nSettings (default, meaning):")
    source = inspect.getsource(Config).splitlines()
    for line in source[source.index("class Config:") + 1:]:
        if m := re.fullmatch(r"\s+# (.*)", line):
            print(f"\n  {m.group(1)}")
        elif m := re.fullmatch(r"\s+(\w+): \w+ = (.*?)(?:\s+# (.*))?", line):
            default = repr(getattr(Config(), m.group(1)))
            print(f"    --{m.group(1)}={default}".ljust(40) + f" {m.group(3) or ''}".rstrip())


def trim_metrics(path, step):
    """Keep the complete lines of metrics.jsonl up to `step` (a kill may have cut the last one short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------------------
# the run: setup, resume, the loop, finish


@dataclass
class Run:
    """What the phases share: the settings, this process's place in the job, its inputs, the log, the watchdog."""
    cfg: Config
    config_path: Path
    rank: int
    world: int
    device: torch.device
    watchdog: ranks.Watchdog | None
    out_dir: Path
    tokenizer: data.Tokenizer = None
    loader: data.Loader = None      # training batches
    val_loader: data.Loader = None  # validation batches, rewound to val_start for every evaluation
    val_start: dict = None
    pairs: list = None              # (query, passage) of the retrieval evaluation
    mconf: ModernBertConfig = None
    commit: str = ""
    log_file: object = None         # rank 0's log.txt, metrics.jsonl and Weights & Biases run
    metrics_file: object = None
    wandb: object = None

    @property
    def master(self):
        return self.rank == 0

    def at(self, step, phase):
        if self.watchdog:
            self.watchdog.at(step, phase)

    def patient(self, phase):
        return self.watchdog.patient(phase) if self.watchdog else contextlib.nullcontext()

    def barrier(self, name):
        if self.watchdog:
            self.watchdog.barrier(name)

    def log(self, message):
        if self.master:
            tqdm.write(message)
            self.log_file.write(message + "\n")
            self.log_file.flush()

    def record(self, entry):
        if self.master:
            self.metrics_file.write(json.dumps(entry) + "\n")
            self.metrics_file.flush()
            if self.wandb:
                self.wandb.log(entry, step=entry["step"])


def setup(args):
    """The settings and inputs, checked on every rank and agreed before anything else; the process group and the
    watchdog; out_dir proven shared; the demo data built if asked; the log opened. -> Run"""
    rank, world = ranks.torchrun_place()
    try:
        cfg, config_path = load_config(args)
        problem = check_inputs(cfg, config_path, world)
    except Problem as e:  # agreed on below: every rank stops, not only those that see it
        cfg, config_path, problem = Config(), None, str(e)
    if problem and not ranks.under_torchrun():  # one process: nobody to tell
        raise Problem(problem)
    device = ranks.start(cfg.collective_timeout)
    if device.type == "cpu":
        cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    ranks.stop_if_any(problem)
    watchdog = ranks.Watchdog(rank, world, cfg.collective_timeout) if world > 1 else None
    run = Run(cfg, config_path, rank, world, device, watchdog, Path(cfg.out_dir))
    run.at(0, "checking out_dir")
    ranks.stop_if_any(ranks.prove_shared(run.out_dir, rank))

    if run.master and cfg.demo_data and not Path(cfg.data_dir).exists():  # = python demo.py --out DIR
        print(f"{cfg.data_dir} is missing: building the demo data in {Path(cfg.data_dir).parent}", flush=True)
        with run.patient("building the demo data"):
            print(data.summary(demo.build(Path(cfg.data_dir).parent)), flush=True)
    run.barrier("demo data")
    run.at(0, "opening the inputs")
    try:
        run.tokenizer, run.loader, run.val_loader, run.pairs = open_inputs(cfg, config_path, rank, world)
        problem = None
    except Problem as e:
        problem = str(e)
    ranks.stop_if_any(problem)
    run.val_start, run.mconf, run.commit = run.val_loader.state_dict(), model_config(cfg, run.tokenizer), git_commit()

    if run.master:
        checkpoint.remove_partial(run.out_dir)  # what a kill while saving or removing left
        run.log_file = open(run.out_dir / "log.txt", "a")
        if run.watchdog:
            run.watchdog.log_file = run.log_file
    run.log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} python train.py {' '.join(args)}")
    run.log(f"# commit {run.commit}; python {platform.python_version()}, torch {torch.__version__}; {world} x "
            f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dist.get_backend()}")
    run.log("# config (" + str(config_path) + "):\n" + "\n".join(f"{k} = {v!r}" for k, v in asdict(cfg).items()))
    run.log("# model: " + ", ".join(f"{k}={v}" for k, v in asdict(run.mconf).items()))
    if warning := ranks.restart_warning():
        run.log(warning)
    if cfg.warmup_steps >= cfg.max_steps:
        run.log(f"warning: warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate never "
                f"reaches lr {cfg.lr} nor decays")
    micro = (f"micro-steps of <= {cfg.micro_batch_tokens} tokens" if cfg.micro_batch_tokens else
             f"{cfg.batch_size // (world * cfg.micro_batch_size)} micro-steps of {cfg.micro_batch_size} sequences")
    run.log(f"{micro} x {world} processes = {cfg.batch_size} sequences of <= {cfg.max_seqlen} tokens per step; "
            f"{cfg.max_steps} steps; {DTYPES[cfg.dtype](device)} compute")
    if isinstance(cfg.data_dir, dict):
        total = sum(cfg.data_dir.values())
        run.log("mixture of " + ", ".join(f"{d} ({w / total:.1%} of the tokens)" for d, w in cfg.data_dir.items()))
    if cfg.batch_warmup_tokens:
        run.log(f"batch-size warmup: {cfg.batch_size_start} sequences per step at first, growing in multiples of it "
                f"to {cfg.batch_size} over the first {cfg.batch_warmup_tokens:,} tokens")
    if cfg.micro_batch_tokens and run.master:
        run.log(data.micro_batch_report(run.loader, cfg.batch_size, cfg.micro_batch_tokens, cfg.max_seqlen,
                                        world))
    return run


FIXED = ("data_dir", "tokenizer", "mode")  # what a checkpoint's data position means: resume_from keeps them
BRANCH_OWN = ("out_dir", "resume_from")  # what a run branched with resume_from always has of its own
NEW_FOR_SAME_WEIGHTS = ("global_rope_theta", "local_rope_theta", "max_position_embeddings")  # init_from may change


def same_input(key, theirs, mine):
    """Whether a checkpoint's data_dir, tokenizer or mode is this run's (paths compared where they point from here)."""
    if key == "mode" or not theirs or not mine:
        return theirs == mine
    if isinstance(theirs, dict) or isinstance(mine, dict):  # mixtures: the same corpora with the same weights
        def resolved(m):
            return {str(Path(d).resolve()): w for d, w in m.items()} if isinstance(m, dict) else m
        return resolved(theirs) == resolved(mine)
    return Path(theirs).resolve() == Path(mine).resolve()


def resume(run):
    """The model (seeded, or init_from's weights), sharded, and its optimizer; then the newest checkpoint of out_dir
    that verifies (none: resume_from's), one choice for every rank, loaded into them and into the loader; the shards
    verified meanwhile. -> (model, optimizer, step)"""
    cfg, rank, world, device = run.cfg, run.rank, run.world, run.device
    run.at(0, "choosing a checkpoint")
    ckpt, meta = checkpoint.latest(run.out_dir, report=run.log)
    branched = not ckpt and bool(cfg.resume_from)  # this run's own checkpoints come first
    if branched:
        try:
            ckpt, meta = Path(cfg.resume_from), checkpoint.verify(cfg.resume_from)
        except Problem as e:  # the same on every rank
            raise Problem(f"resume_from {e}") from None
    if ckpt and meta["step"] > cfg.max_steps:  # the loop would never reach its last step
        raise Problem(f"{ckpt} is at step {meta['step']}, past max_steps {cfg.max_steps}")
    changed = ckpt and checkpoint.config_differences(meta["model_config"], asdict(run.mconf))
    ranks.stop_if_any(f"{ckpt}: the model differs from this run's: " + ", ".join(
        f"{k} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()) if changed else None)
    if branched and (other := [f"{k} {meta['config'].get(k)!r} there, {getattr(cfg, k)!r} here" for k in FIXED
                               if not same_input(k, meta["config"].get(k), getattr(cfg, k))]):
        raise Problem(f"resume_from {ckpt}: " + ", ".join(other) + " (a run continues on the data it was trained on)")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, then sharded
    model, problem = ModernBERT(run.mconf), None
    if cfg.init_from and not ckpt:
        try:
            source, _ = checkpoint.load_model(cfg.init_from)
            changed = checkpoint.config_differences(asdict(source.config), asdict(run.mconf))
            describe = lambda keys: ", ".join(f"{k} {changed[k][0]!r} there, {changed[k][1]!r} here" for k in keys)
            if fixed := [k for k in changed if k not in NEW_FOR_SAME_WEIGHTS]:
                problem = f"init_from {cfg.init_from}: the model differs from this run's: " + describe(fixed)
            else:
                run.log(f"initialising weights from {cfg.init_from}" + (f" ({describe(changed)})" if changed else ""))
                model.load_state_dict(source.state_dict())
        except Problem as e:
            problem = f"init_from {e}"
    ranks.stop_if_any(problem)
    run.log(f"parameters: {model.num_params():,} ({model.num_params(embeddings=False):,} without the embedding)")
    if run.master and (warning := checkpoint.space_warning(run.out_dir, cfg.keep_last, model)):
        run.log(warning)
    parallelize(model.to(device), init_device_mesh(device.type, (world,)), DTYPES[cfg.dtype](device), cfg.compile,
                cfg.activation_checkpointing)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas, cfg.eps, device.type)

    # every shard is hashed once before its first use, this rank's share in the background meanwhile; out_dir
    # remembers what was verified, so a restart only stats the files
    verifying = data.verify_in_background(data_dirs(cfg), run.out_dir, rank, world)
    step = 0
    if ckpt:
        # the loader state is the same on every rank (a position in the global sample stream), so a run may
        # resume on another number of processes; only the RNG streams (dropout) then restart from rank 0's
        run.at(0, "loading a checkpoint")
        own = checkpoint.load(ckpt, model, optimizer)
        run.loader.load_state_dict(own["loader"])
        torch.set_rng_state(own["rng"]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(own["rng"]["cuda"], device)
        step = meta["step"]
        changed = {k: (meta["config"].get(k), v) for k, v in asdict(cfg).items()
                   if json.dumps(meta["config"].get(k)) != json.dumps(v) and not (branched and k in BRANCH_OWN)}
        before = replace(cfg, **{k: meta["config"].get(k, getattr(Config(), k))  # older checkpoints: linear
                                 for k in ("lr", "warmup_steps", "schedule", *SCHEDULE)})
        later = {k: changed.pop(k) for k in SCHEDULE if k in changed} if stable_so_far(before, cfg, step) else {}
        run.log(f"resuming from {ckpt}{' (resume_from)' if branched else ''} at step {step}"
                + (f"; {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in later.items())}: the stable phase "
                   f"continues, the learning rates so far are unchanged" if later else "")
                + (f"; config changed since: {changed}" if changed else "")
                + (f"; written by {meta['world_size']} processes, now {world}" if meta["world_size"] != world else ""))
    if run.master:  # lines past the checkpoint (all, without one) are about to be recomputed
        trim_metrics(run.out_dir / "metrics.jsonl", step if ckpt else -1)
        run.metrics_file = open(run.out_dir / "metrics.jsonl", "a")
        if cfg.wandb:
            import wandb
            run.wandb = wandb.init(project=cfg.wandb_project, name=run.out_dir.name, config=asdict(cfg))
    with run.patient("verifying the shards"):  # ranks may finish hours apart on a first run
        problem = verifying.result()
    run.barrier("shards verified")
    ranks.stop_if_any(problem)
    return model, optimizer, step


def train(run, model, optimizer, step):
    """The loop: evaluation and checkpoint at the top of a step, then the micro-steps, clipping, the update and the
    log. -> the last step"""
    cfg, device, world, start = run.cfg, run.device, run.world, step
    peak_flops = gpu_peak_flops(device)  # None: mfu is null
    batches = run.loader.prefetch(pin_memory=device.type == "cuda")  # the next step is built while this one runs
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not (run.master and sys.stdout.isatty()),
                    dynamic_ncols=True)
    while True:
        last_step = step == cfg.max_steps
        # a resumed run evaluated this step before its checkpoint
        if cfg.eval_every and (start == 0 or step > start) and (last_step or step % cfg.eval_every == 0):
            model.eval()
            entry = {"step": step, **evaluate_mlm(run, model, step)}
            if cfg.retrieval_eval:
                entry.update(evaluate_retrieval(run, model, step) or {})
            model.train()
            run.record(entry)
            run.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step"))
        if step > start and (last_step or step % cfg.checkpoint_every == 0):
            run.at(step, "saving a checkpoint")
            if run.master and (warning := checkpoint.space_warning(run.out_dir, cfg.keep_last, model, step)):
                run.log(warning)
            t0 = time.perf_counter()
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            path, hashing = checkpoint.save(run.out_dir, step, model, optimizer,
                                            {"loader": run.loader.state_dict(), "rng": rng},
                                            {"commit": run.commit, "config": asdict(cfg),
                                             "model_config": asdict(run.mconf)}, cfg.keep_last)
            run.log(f"step {step}: saved {path} in {time.perf_counter() - t0:.1f} s ({hashing:.1f} s of it checksums)")
        if last_step:
            break

        run.at(step, "training")
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_size = run.loader.global_batch(run.loader.seen)  # before this step's batch is handed out
        micro_batches = next(batches)
        assert cfg.micro_batch_tokens or len(micro_batches) == batch_size // (world * cfg.micro_batch_size)
        # by token budget, every rank gets as many micro-batches, some empty (nothing to predict, not counted)
        n_masked = [int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches]
        seqlens = [l for mb in micro_batches if not mb.get("empty") for l in torch.diff(mb["cu_seqlens"]).tolist()]
        flops = model.train_flops(seqlens, sum(n_masked))
        counts = torch.tensor([sum(n_masked), sum(seqlens), flops], dtype=torch.float64, device=device)
        dist.all_reduce(counts)  # over all ranks: masked tokens, real tokens, model FLOPs of this step
        total_masked = counts[0].clamp(min=1)  # stays on the device: the forward need not wait for the all-reduce
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb, n in zip(micro_batches, n_masked):
            run.at(step, "training")
            _, loss = model(mb["input_ids"].to(device, non_blocking=True),
                            labels=mb["labels"].to(device, non_blocking=True),
                            cu_seqlens=mb["cu_seqlens"].to(device, non_blocking=True), max_seqlen=mb["max_seqlen"])
            # mean over the masked tokens of the global batch, however it is split into micro-batches and ranks
            # (parallelize() makes the reduction across ranks a sum)
            (loss * (n / total_masked)).backward()
            loss_sum += loss.detach().double() * n
        dist.all_reduce(loss_sum)
        loss = (loss_sum / total_masked).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).full_tensor().item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank: one line per node
            last = checkpoint.list_checkpoints(run.out_dir)
            message = (f"step {step + 1}: loss {loss}, grad norm {grad_norm}; stopped before the update (last "
                       f"checkpoint: {last[-1] if last else 'none'})")
            raise Problem(message if os.environ.get("LOCAL_RANK", "0") == "0" else "")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0

        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps:
            tokens = int(counts[1].item())
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "batch_size": batch_size,
                     "tokens": tokens, "tokens_per_s": tokens / dt,
                     "mfu": counts[2].item() / dt / (peak_flops * world) if peak_flops else None,
                     "peak_mem": peak_memory_gib(device)}
            if isinstance(run.loader, data.Mixture):  # each corpus's tokens and epochs so far
                entry["corpora"] = run.loader.progress()
            run.record(entry)
            run.log(f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                    f"{tokens} tokens, {tokens / dt:,.0f} tokens/s"
                    + (f" | mfu {entry['mfu']:.1%}" if peak_flops else "") + f" | peak mem {entry['peak_mem']:.2f} GiB")
    progress.close()
    return step


def finish(run, model, step):
    """The final model in Hugging Face format (gathered to rank 0), then every rank leaves together (ranks.end)."""
    run.at(step, "exporting the final model")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only
    if run.master:
        final = ModernBERT(run.mconf)
        final.load_state_dict(state)
        meta = {"step": step, "world_size": run.world, "commit": run.commit, "config": asdict(run.cfg),
                "model_config": asdict(run.mconf)}
        missing = checkpoint.export_hf(final, run.out_dir / "hf", run.cfg.tokenizer, meta)
        run.log(f"saved the final model to {run.out_dir / 'hf'}"
                + (f" (without a tokenizer: {missing} is gone)" if missing else ""))
        if run.wandb:
            run.wandb.finish()
    dist.barrier()
    if run.watchdog:
        run.watchdog.close()
    if run.master:
        run.log_file.close()
        run.metrics_file.close()
    ranks.end()


def main():
    args, run = sys.argv[1:], None
    try:
        if args[:1] == ["--export"]:
            return export(args[1:])
        if args[:1] in (["--help"], ["-h"]):
            return usage()
        if not args or args[0].startswith("--"):
            raise Problem("usage: python train.py CONFIG [--key=value ...]  |  python train.py --export CKPT_DIR "
                          "[OUT_DIR] [--unnormalized]  |  python train.py --help")
        run = setup(args)
        model, optimizer, step = resume(run)
        step = train(run, model, optimizer, step)
        finish(run, model, step)
    except Problem as e:
        ranks.exit_with(str(e), run and run.log_file)
    except RuntimeError as e:
        if not (what := ranks.collective_failure(e)):
            raise
        if run and run.watchdog:
            run.watchdog.fail(what, stalled=False)
        ranks.exit_with(what, run and run.log_file)
    finally:  # a bug's traceback: the monitor thread must not be inside a store call as the interpreter exits
        if run and run.watchdog:
            run.watchdog.close()


if __name__ == "__main__":
    record(main)()  # a bug's traceback goes to torchrun's summary too, naming the rank that raised it
