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
line per logged step and per evaluation), checkpoints ckpt_STEP/ (the last `keep_last`) and, at the end,
the model in Hugging Face format in hf/ (config.json, model.safetensors, tokenizer.model). Running the same
command again resumes from the newest checkpoint that verifies (checkpoint.py): the same batches, masks and
losses as an uninterrupted run, on any number of processes.
`--export` writes a checkpoint in the same format, to DIR or to out_dir/hf_STEP. With several nodes, out_dir
must be on a filesystem that all of them see.
"""
import ast
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm

import checkpoint
import data
from evaluate import retrieval_scores
from model import PRESETS, ModernBERT, ModernBertConfig, cpu_threads, parallelize

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
    # data (data.py): shards prepared from a jsonl corpus with `tokenizer`
    data_dir: str = "data/demo/shards"  # shard directory written by python data.py prepare
    tokenizer: str = "data/demo/tokenizer.model"  # sentencepiece model the shards were made with
    demo_data: bool = False      # if data_dir is missing, build the demo corpus, tokenizer and shards in its parent
    mode: str = "line_by_line"   # one document per sequence, truncated; or "packed" into max_seqlen rows
    max_seqlen: int = 1024       # tokens per sequence, <CLS> and <SEP> included
    batch_size: int = 64         # global sequences (packed mode: rows of max_seqlen tokens) per optimizer step
    micro_batch_size: int = 16   # sequences per process per forward/backward (evaluation, and training by count)
    micro_batch_tokens: int = 0  # > 0: training micro-batches of at most this many tokens instead, >= max_seqlen
    mlm_probability: float = 0.3  # share of tokens masked (80% <MASK>, 10% random, 10% kept)
    # evaluation
    eval_batches: int = 10       # validation batches (of batch_size sequences) for MLM loss and accuracy
    retrieval_eval: str = ""     # MIRACL-layout jsonl for zero-shot Recall@10 / MRR@10; "" = skip
    retrieval_max_len: int = 512  # tokens per text in the retrieval evaluation
    # optimizer: AdamW, linear warmup to lr, then linear decay to 0 at max_steps
    lr: float = 5e-4             # peak learning rate
    warmup_steps: int = 100      # steps of linear warmup from 0 to lr
    betas: tuple = (0.9, 0.98)   # AdamW betas
    eps: float = 1e-6            # AdamW epsilon
    weight_decay: float = 1e-5   # on the linear layers' weight matrices only
    grad_clip: float = 1.0       # maximum global gradient norm
    # system
    dtype: str = "auto"          # compute dtype: "auto" = bfloat16 on CUDA, float32 on CPU; weights stay fp32
    compile: bool = False        # torch.compile the MLPs, embeddings and MLM head
    activation_checkpointing: bool = False  # recompute each layer in backward (long sequences)
    wandb: bool = False          # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "llm-jp-modernbert"  # Weights & Biases project


CHOICES = {"mode": ("line_by_line", "packed"), "dtype": ("auto", "float32", "bfloat16")}
POSITIVE = ("max_steps", "log_every", "checkpoint_every", "keep_last", "batch_size", "micro_batch_size", "max_seqlen")
# bf16 dense peak per GPU, for MFU; other devices report mfu as null
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def fail(message):
    """Stop with one line for people (printed once, by rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


# -----------------------------------------------------------------------------------------------------------
# config


def find_config(arg):
    path = Path(arg)
    if path.is_file():
        return path
    for name in (path.name, path.name + ".py"):
        if (REPO / "configs" / name).is_file():
            return REPO / "configs" / name
    fail(f"config {arg}: no such file, nor configs/{path.name}")


def set_key(cfg, key, value, where):
    types = {f.name: f.type for f in fields(Config)}
    if key not in types:
        fail(f"{where}: unknown config key {key!r}")
    want = types[key]
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        fail(f"{where}: config key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        fail(f"{where}: config key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value < 1:
        fail(f"{where}: config key {key!r} must be at least 1, got {value}")
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
        fail(f"{path}:{e.lineno}: {e.msg}")
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if f.filename == str(path)), "?")
        fail(f"{path}:{line}: {type(e).__name__}: {e}")
    for key, value in namespace.items():
        if not key.startswith("__"):
            set_key(cfg, key, value, f"{path}:{lines.get(key, '?')}")
    for arg in args[1:]:
        match = re.fullmatch(r"--(\w+)=(.*)", arg, re.S)
        if not match:
            fail(f"command line: {arg!r} is not --key=value")
        key, raw = match.groups()
        want = {f.name: f.type for f in fields(Config)}.get(key)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string
        if want is str and not isinstance(value, str):
            value = raw  # --out_dir=123 means the string "123"
        set_key(cfg, key, value, "command line")
    if cfg.batch_size % cfg.micro_batch_size:
        fail(f"{path}: {divisibility(cfg.batch_size, 1, cfg.micro_batch_size)}")
    known = {f.name for f in fields(ModernBertConfig)}
    for key in cfg.model_args:
        if key not in known:
            fail(f"config key model_args: {key!r} is not a ModernBertConfig field")
        if key in FROM_TOKENIZER:
            fail(f"config key model_args: {key!r} comes from the tokenizer, not the config")
    if cfg.model not in PRESETS:
        fail(f"config key model: unknown preset {cfg.model!r} (known: {', '.join(PRESETS)})")
    try:
        ModernBertConfig.preset(cfg.model, **cfg.model_args)
    except (ValueError, TypeError, AssertionError) as e:
        fail(f"config key model_args: {e}")
    return cfg, path


FROM_TOKENIZER = {"vocab_size": "vocab_size", "pad_token_id": "pad_id", "cls_token_id": "cls_id",
                  "sep_token_id": "sep_id", "mask_token_id": "mask_id"}


def model_config(cfg, tokenizer):
    """The architecture: preset + model_args, with the vocabulary size and special ids of the tokenizer."""
    ids = {key: getattr(tokenizer, attr) for key, attr in FROM_TOKENIZER.items()}
    return ModernBertConfig.preset(cfg.model, **cfg.model_args, **ids)


# -----------------------------------------------------------------------------------------------------------
# inputs


def missing_inputs(cfg, config_path):
    """Every input file or directory the config names that is not there, each with how to make it."""
    missing = []
    if not (cfg.demo_data and not Path(cfg.data_dir).exists()):  # otherwise the demo data is built below
        if not Path(cfg.data_dir).is_dir():
            missing.append(f"data_dir {cfg.data_dir}: make it with python data.py prepare --input 'CORPUS/*.jsonl' "
                           f"--tokenizer {cfg.tokenizer} --out {cfg.data_dir}")
        if not Path(cfg.tokenizer).is_file():
            missing.append(f"tokenizer {cfg.tokenizer}: put the llm-jp tokenizer there, or train one with python "
                           f"data.py tokenizer --input CORPUS.jsonl --vocab_size 100000 --out {cfg.tokenizer}")
        if cfg.retrieval_eval and not Path(cfg.retrieval_eval).is_file():
            missing.append(f"retrieval_eval {cfg.retrieval_eval}: put MIRACL ja (train split, jsonl) there, or "
                           f"skip that evaluation with --retrieval_eval=''")
    if cfg.init_from and not Path(cfg.init_from).exists():
        writes = re.compile(rf"^out_dir\s*=\s*[\"']{re.escape(str(Path(cfg.init_from).parent))}[\"']", re.M)
        makers = [p for p in sorted((REPO / "configs").glob("*.py")) if writes.search(p.read_text())]
        how = (f"python train.py {makers[0].relative_to(REPO)}" if makers and Path(cfg.init_from).name == "hf"
               else "the final export (OUT_DIR/hf) of a training run, or a Hugging Face ModernBERT directory")
        missing.append(f"init_from {cfg.init_from}: make it with {how}")
    return missing


# -----------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_mlm(model, cfg, rank, world, device):
    """Masked-token loss and accuracy on the validation split (the same batches and masks every time)."""
    loader = data.Loader(cfg.data_dir, split="val", batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_seqlen=cfg.max_seqlen, rank=rank, world_size=world, seed=cfg.seed, mode=cfg.mode,
                         mlm_probability=cfg.mlm_probability, shuffle=False, verify=False)
    info = loader.tokenizer_info
    empty = {"input_ids": torch.tensor([info["cls_id"], info["sep_id"]]), "labels": torch.tensor([-100, -100]),
             "cu_seqlens": torch.tensor([0, 2], dtype=torch.int32), "max_seqlen": 2}
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, masked tokens
    for _, micro_batches in zip(range(cfg.eval_batches), loader):
        # the split's last batch may give some ranks fewer micro-batches; they run empty ones, because every
        # rank must take part in every sharded forward
        most = torch.tensor(len(micro_batches), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for mb in micro_batches + [empty] * (int(most) - len(micro_batches)):
            labels = mb["labels"].to(device)
            logits, loss = model(mb["input_ids"].to(device), labels=labels, cu_seqlens=mb["cu_seqlens"].to(device),
                                 max_seqlen=mb["max_seqlen"])
            target = labels[labels != -100]
            totals += torch.stack([loss.double() * len(target), (logits.argmax(-1) == target).sum().double(),
                                   torch.tensor(len(target), dtype=torch.float64, device=device)])
    dist.all_reduce(totals)
    return {"val_loss": (totals[0] / totals[2]).item(), "val_acc": (totals[1] / totals[2]).item()}


# -----------------------------------------------------------------------------------------------------------
# training


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
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def export(args):
    """python train.py --export CKPT_DIR [OUT_DIR]: one process, no GPU needed."""
    if not 1 <= len(args) <= 2:
        fail("usage: python train.py --export CKPT_DIR [OUT_DIR]")
    ckpt = Path(args[0])
    try:
        meta = checkpoint.verify(ckpt)
        model = ModernBERT(ModernBertConfig(**meta["model_config"]))
        checkpoint.load_weights(model, ckpt)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    out = Path(args[1]) if len(args) == 2 else ckpt.parent / f"hf_{meta['step']}"
    checkpoint.export_hf(model, out, meta["config"]["tokenizer"], meta)
    print(f"exported {ckpt} (step {meta['step']}) to {out}")


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


def divisibility(batch_size, world, micro_batch_size):
    fits = [m for m in range(1, batch_size // world + 1) if batch_size % (world * m) == 0]
    split = f"{world} processes x " if world > 1 else ""
    return (f"batch_size {batch_size} is not a multiple of {split}micro_batch_size {micro_batch_size}"
            + (f"; micro_batch_size can be {', '.join(map(str, fits))}" if fits else
               f"; batch_size must be a multiple of the {world} processes"))


def main():
    if sys.argv[1:2] == ["--export"]:
        return export(sys.argv[2:])
    if sys.argv[1:2] in (["--help"], ["-h"]):
        return usage()
    if len(sys.argv) < 2 or sys.argv[1].startswith("--"):
        fail("usage: python train.py CONFIG [--key=value ...]  |  python train.py --export CKPT_DIR [OUT_DIR]  |  "
             "python train.py --help")
    cfg, config_path = load_config(sys.argv[1:])
    missing = missing_inputs(cfg, config_path)
    if missing:  # all at once, before any process waits for another
        fail(f"{config_path}: {len(missing)} input{'s' if len(missing) > 1 else ''} missing:\n  "
             + "\n  ".join(missing))

    if (os.environ.get("MODERNBERT_ATTENTION") == "kernels" and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        fail("MODERNBERT_ATTENTION=kernels needs a CUDA GPU, and none is visible (on a CPU: TRITON_INTERPRET=1)")

    # processes: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is a group of one
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (world * cfg.micro_batch_size):
        fail(divisibility(cfg.batch_size, world, cfg.micro_batch_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    master = rank == 0
    mesh = init_device_mesh(device.type, (world,))
    grad_accum = cfg.batch_size // (world * cfg.micro_batch_size)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]

    if master and cfg.demo_data and not Path(cfg.data_dir).exists():  # = python data.py demo --out DIR
        print(f"{cfg.data_dir} is missing: building the demo data in {Path(cfg.data_dir).parent}", flush=True)
        data.main(["demo", "--out", str(Path(cfg.data_dir).parent)])
    dist.barrier()
    missing = missing_inputs(cfg, config_path)
    if missing:
        fail(f"{config_path}: " + "; ".join(missing))
    tokenizer = data.Tokenizer(cfg.tokenizer)
    out_dir = Path(cfg.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(out_dir)
    dist.barrier()

    log_file = open(out_dir / "log.txt", "a") if master else None

    def log(message):
        if master:
            tqdm.write(message)
            log_file.write(message + "\n")
            log_file.flush()

    commit = git_commit()
    mconf = model_config(cfg, tokenizer)
    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} python train.py {' '.join(sys.argv[1:])}")
    log(f"# commit {commit}; python {platform.python_version()}, torch {torch.__version__}; "
        f"{world} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {backend}")
    log("# config (" + str(config_path) + "):\n" + "\n".join(f"{k} = {v!r}" for k, v in asdict(cfg).items()))
    log("# model: " + ", ".join(f"{k}={v}" for k, v in asdict(mconf).items()))
    if cfg.warmup_steps >= cfg.max_steps:
        log(f"warning: warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate never "
            f"reaches lr {cfg.lr} nor decays")
    resume, meta = checkpoint.latest(out_dir, report=log)  # the newest checkpoint that verifies
    if resume and (changed := checkpoint.config_differences(meta["model_config"], asdict(mconf))):
        fail(f"{resume}: the model differs from this run's: " + ", ".join(
            f"{k} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()))

    # model: identical init on every rank (same seed), then sharded
    torch.manual_seed(cfg.seed)
    model = ModernBERT(mconf)
    if cfg.init_from and not resume:
        log(f"initialising weights from {cfg.init_from}")
        try:
            source, _ = checkpoint.load_model(cfg.init_from)
        except checkpoint.CheckpointError as e:
            fail(f"init_from {e}")
        if changed := checkpoint.config_differences(asdict(source.config), asdict(mconf)):
            fail(f"init_from {cfg.init_from}: the model differs from this run's: " + ", ".join(
                f"{k} {a!r} there, {b!r} here" for k, (a, b) in changed.items()))
        model.load_state_dict(source.state_dict())
    log(f"parameters: {model.num_params():,} ({model.num_params(embeddings=False):,} without the embedding)")
    parallelize(model.to(device), mesh, dtype, cfg.compile, cfg.activation_checkpointing)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas, cfg.eps, device.type)

    if cfg.micro_batch_tokens and cfg.micro_batch_tokens < cfg.max_seqlen:
        fail(f"micro_batch_tokens {cfg.micro_batch_tokens} is less than max_seqlen {cfg.max_seqlen}")
    loader = data.Loader(cfg.data_dir, split="train", batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_seqlen=cfg.max_seqlen, rank=rank, world_size=world, seed=cfg.seed, mode=cfg.mode,
                         mlm_probability=cfg.mlm_probability, shuffle=True, verify=False, tokenizer=tokenizer,
                         micro_batch_tokens=cfg.micro_batch_tokens)
    # every shard is hashed once before its first use, this rank's share in the background meanwhile; out_dir
    # remembers what was verified, so a restart only stats the files
    verifying = data.verify_in_background(cfg.data_dir, out_dir, rank, world)
    step = 0
    if resume:
        # the loader state is the same on every rank (a position in the global sample stream), so a run may
        # resume on another number of processes; only the RNG streams (dropout) then restart from rank 0's
        own = checkpoint.load(resume, model, optimizer)
        loader.load_state_dict(own["loader"])
        torch.set_rng_state(own["rng"]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(own["rng"]["cuda"], device)
        step = meta["step"]
        changed = {k: (meta["config"].get(k), v) for k, v in asdict(cfg).items()
                   if json.dumps(meta["config"].get(k)) != json.dumps(v)}
        log(f"resuming from {resume} at step {step}" + (f"; config changed since: {changed}" if changed else "")
            + (f"; written by {meta['world_size']} processes, now {world}" if meta["world_size"] != world else ""))
    if master:  # lines past the checkpoint (all, without one) are about to be recomputed
        trim_metrics(out_dir / "metrics.jsonl", step if resume else -1)
    start = step
    metrics_file = open(out_dir / "metrics.jsonl", "a") if master else None
    micro = (f"micro-steps of <= {cfg.micro_batch_tokens} tokens" if cfg.micro_batch_tokens else
             f"{grad_accum} micro-steps of {cfg.micro_batch_size} sequences")
    log(f"{micro} x {world} processes = {cfg.batch_size} sequences of <= {cfg.max_seqlen} tokens per step; "
        f"{cfg.max_steps} steps; {dtype} compute")

    run_wandb = None
    if cfg.wandb and master:
        try:
            import wandb
        except ImportError:
            fail("config key wandb: True, but the wandb package is not installed (pip install wandb)")
        run_wandb = wandb.init(project=cfg.wandb_project, name=out_dir.name, config=asdict(cfg))

    def record(entry):
        if master:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()
            if run_wandb:
                run_wandb.log(entry, step=entry["step"])

    def save_checkpoint():
        t0 = time.perf_counter()
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        path, hashing = checkpoint.save(out_dir, step, model, optimizer, {"loader": loader.state_dict(), "rng": rng},
                                        {"commit": commit, "config": asdict(cfg), "model_config": asdict(mconf)},
                                        cfg.keep_last)
        log(f"step {step}: saved {path} in {time.perf_counter() - t0:.1f} s ({hashing:.1f} s of it checksums)")

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
    problems = [None] * world
    dist.all_gather_object(problems, verifying.result())
    if any(problems):
        fail(next(p for p in problems if p))
    batches = loader.prefetch(pin_memory=device.type == "cuda")  # the next step is built while this one runs
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not (master and sys.stdout.isatty()), dynamic_ncols=True)
    while True:
        last_step = step == cfg.max_steps
        if cfg.eval_every and not (resume and step == start) and (last_step or step % cfg.eval_every == 0):
            model.eval()
            entry = {"step": step, **evaluate_mlm(model, cfg, rank, world, device)}
            if cfg.retrieval_eval:
                scores = retrieval_scores(model, tokenizer, cfg.retrieval_eval, max_len=cfg.retrieval_max_len)
                entry.update({"recall@10": scores["recall@10"], "mrr@10": scores["mrr@10"]})
            model.train()
            record(entry)
            log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step"))
        if step > start and (last_step or step % cfg.checkpoint_every == 0):
            save_checkpoint()
        if last_step:
            break

        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = next(batches)
        assert cfg.micro_batch_tokens or len(micro_batches) == grad_accum, len(micro_batches)
        # by token budget, every rank gets as many micro-batches, some empty (nothing to predict, not counted)
        n_masked = [int((mb["labels"] != -100).sum()) for mb in micro_batches]
        seqlens = [l for mb in micro_batches if not mb.get("empty") for l in torch.diff(mb["cu_seqlens"]).tolist()]
        flops = 3 * model.flops_per_token(seqlens, sum(n_masked)) * sum(seqlens)
        counts = torch.tensor([sum(n_masked), sum(seqlens), flops], dtype=torch.float64, device=device)
        dist.all_reduce(counts)  # over all ranks: masked tokens, real tokens, model FLOPs of this step
        total_masked = counts[0].clamp(min=1)  # stays on the device: the forward need not wait for the all-reduce
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb, n in zip(micro_batches, n_masked):
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
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = checkpoint.list_checkpoints(out_dir)
            message = (f"step {step + 1}: loss {loss}, grad norm {grad_norm}; stopped before the update "
                       f"(last checkpoint: {last[-1] if last else 'none'})")
            if master:
                log_file.write(f"error: {message}\n")
            fail(message)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0

        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps:
            tokens = int(counts[1].item())
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                     "tokens_per_s": tokens / dt,
                     "mfu": counts[2].item() / dt / (peak_flops * world) if peak_flops else None,
                     "peak_mem": peak_memory_gib(device)}
            record(entry)
            log(f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tokens} tokens, {tokens / dt:,.0f} tokens/s"
                + (f" | mfu {entry['mfu']:.1%}" if peak_flops else "") + f" | peak mem {entry['peak_mem']:.2f} GiB")
    progress.close()

    # the final model in Hugging Face format
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only
    if master:
        final = ModernBERT(mconf)
        final.load_state_dict(state)
        meta = {"step": step, "world_size": world, "commit": commit, "config": asdict(cfg), "model_config": asdict(mconf)}
        checkpoint.export_hf(final, out_dir / "hf", cfg.tokenizer, meta)
        log(f"saved the final model to {out_dir / 'hf'}")
    if run_wandb:
        run_wandb.finish()
    dist.barrier()
    dist.destroy_process_group()


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


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # missing or mismatched shards, tokenizer, eval files
        fail(str(e))
