"""
Pretrain a ModernBERT encoder with masked language modelling, on one process or many (FSDP2).

    python train.py configs/demo.py                          # CPU or one GPU
    python train.py configs/demo.py --max_steps=100 --lr=1e-3
    torchrun --nproc_per_node=8 train.py configs/stage1.py   # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py stage1
    python train.py --export out/stage1/ckpt_20000 [DIR]     # any checkpoint -> Hugging Face format

A config file holds `name = value` lines that override the defaults in `Config` below, and `--name=value`
arguments override the file. Unknown names and wrong types stop the run. A config path that does not exist
is looked up by file name in configs/ (`train.py stage2` runs configs/stage2.py).

out_dir receives log.txt (the resolved config, commit and versions, then progress), metrics.jsonl (one JSON
line per logged step and per evaluation), checkpoints ckpt_STEP/ (the last `keep_last`) and, at the end,
the model in Hugging Face format in hf/ (config.json, model.safetensors, tokenizer.model). Running the same
command again resumes from the newest checkpoint: the same batches, masks and losses as an uninterrupted run.
`--export` writes a checkpoint in the same format, to DIR or to out_dir/hf_STEP. With several nodes, out_dir
must be on a filesystem that all of them see.
"""
import ast
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

import data
from evaluate import retrieval_scores
from model import PRESETS, ModernBERT, ModernBertConfig, cpu_threads

REPO = Path(__file__).resolve().parent


@dataclass
class Config:
    # run
    out_dir: str = "out/run"
    seed: int = 0                # model init, data order and masking
    max_steps: int = 1000        # optimizer steps
    log_every: int = 10          # steps between metrics.jsonl lines
    checkpoint_every: int = 1000
    keep_last: int = 2           # checkpoints kept in out_dir
    eval_every: int = 1000       # 0 = never
    # model: a ModernBertConfig preset plus overrides; vocab size and special ids come from the tokenizer
    model: str = "llm-jp-modernbert-base"
    model_args: dict = field(default_factory=dict)
    init_from: str = ""          # start from these weights (a checkpoint dir or a Hugging Face dir), fresh optimizer
    # data (data.py): shards prepared from a jsonl corpus with `tokenizer`
    data_dir: str = "data/demo/shards"
    tokenizer: str = "data/demo/tokenizer.model"
    demo_data: bool = False      # if data_dir is missing, build the demo corpus, tokenizer and shards in its parent
    mode: str = "line_by_line"   # one document per sequence, truncated; or "packed" into max_seqlen rows
    max_seqlen: int = 1024
    batch_size: int = 64         # global sequences (packed mode: rows of max_seqlen tokens) per optimizer step
    micro_batch_size: int = 16   # sequences per process per forward/backward
    mlm_probability: float = 0.3
    # evaluation
    eval_batches: int = 10       # validation batches (of batch_size sequences) for MLM loss and accuracy
    retrieval_eval: str = ""     # MIRACL-layout jsonl for zero-shot Recall@10 / MRR@10; "" = skip
    retrieval_max_len: int = 512
    # optimizer: AdamW, linear warmup to lr, then linear decay to 0 at max_steps
    lr: float = 5e-4
    warmup_steps: int = 100
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    # system
    dtype: str = "auto"          # compute dtype: "auto" = bfloat16 on CUDA, float32 on CPU; weights stay fp32
    compile: bool = False        # torch.compile the MLPs, embeddings and MLM head
    activation_checkpointing: bool = False  # recompute each layer in backward (long sequences)
    wandb: bool = False          # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "llm-jp-modernbert"


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
        fail(f"{path}: batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size}")
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
# checkpoints: out_dir/ckpt_STEP/ = DCP shards of model + optimizer, rank{r}.pt (loader and RNG state of
# rank r), meta.json (step, world size, config, commit). Written as ckpt_STEP.tmp and renamed when complete.


def checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*")
             if (m := re.fullmatch(r"ckpt_(\d+)", p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def load_weights(model, path):
    """Weights only, into an unsharded model: from a training checkpoint or a Hugging Face directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        state = get_model_state_dict(model)
        dcp.load({"model": state}, checkpoint_id=path)
        set_model_state_dict(model, state)
    elif (path / "config.json").is_file():
        try:
            model.load_state_dict(ModernBERT.from_pretrained(path).state_dict())
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            fail(f"init_from {path}: {str(e).splitlines()[0]}")
    else:
        fail(f"init_from {path}: neither a checkpoint (meta.json) nor a Hugging Face directory (config.json)")


def export_hf(model, out, tokenizer_path, meta):
    model.save_pretrained(out)
    if Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, Path(out) / "tokenizer.model")
    with open(Path(out) / "training.json", "w") as f:  # which run, config and commit made these weights
        json.dump(meta, f, indent=2)


def export_checkpoint(args):
    """python train.py --export CKPT_DIR [OUT_DIR]: one process, no GPU needed."""
    if not 1 <= len(args) <= 2:
        fail("usage: python train.py --export CKPT_DIR [OUT_DIR]")
    ckpt = Path(args[0])
    if not (ckpt / "meta.json").is_file():
        fail(f"{ckpt}: not a checkpoint directory (no meta.json)")
    meta = json.loads((ckpt / "meta.json").read_text())
    model = ModernBERT(ModernBertConfig(**meta["model_config"]))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # DCP reads as a group
    load_weights(model, ckpt)
    dist.destroy_process_group()
    out = Path(args[1]) if len(args) == 2 else ckpt.parent / f"hf_{meta['step']}"
    export_hf(model, out, meta["config"]["tokenizer"], meta)
    print(f"exported {ckpt} (step {meta['step']}) to {out}")


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


def main():
    if sys.argv[1:2] == ["--export"]:
        return export_checkpoint(sys.argv[2:])
    if len(sys.argv) < 2 or sys.argv[1].startswith("--"):
        fail("usage: python train.py CONFIG [--key=value ...]  |  python train.py --export CKPT_DIR [OUT_DIR]")
    cfg, config_path = load_config(sys.argv[1:])

    # processes: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is a group of one
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
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
    if cfg.batch_size % (world * cfg.micro_batch_size):
        fail(f"batch_size {cfg.batch_size} is not a multiple of {world} processes x micro_batch_size {cfg.micro_batch_size}")
    grad_accum = cfg.batch_size // (world * cfg.micro_batch_size)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]

    if master and cfg.demo_data and not Path(cfg.data_dir).exists():  # = python data.py demo --out DIR
        print(f"{cfg.data_dir} is missing: building the demo data in {Path(cfg.data_dir).parent}", flush=True)
        data.main(["demo", "--out", str(Path(cfg.data_dir).parent)])
    dist.barrier()
    if not Path(cfg.data_dir).exists():
        fail(f"data_dir {cfg.data_dir}: no such directory (prepare it with data.py)")
    for key in ("tokenizer", "retrieval_eval"):  # here, not at the first evaluation hours later
        if getattr(cfg, key) and not Path(getattr(cfg, key)).is_file():
            fail(f"config key {key}: {getattr(cfg, key)}: no such file")
    tokenizer = data.Tokenizer(cfg.tokenizer)
    out_dir = Path(cfg.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in out_dir.glob("ckpt_*.tmp"):  # a checkpoint whose writing was interrupted
            shutil.rmtree(tmp)
    dist.barrier()
    saved = checkpoints(out_dir)
    resume = saved[-1] if saved else None

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

    # model: identical init on every rank (same seed), then sharded
    torch.manual_seed(cfg.seed)
    model = ModernBERT(mconf)
    if cfg.init_from and not resume:
        log(f"initialising weights from {cfg.init_from}")
        load_weights(model, cfg.init_from)
    log(f"parameters: {model.num_params():,} ({model.num_params(embeddings=False):,} without the embedding)")
    model.to(device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if cfg.compile:  # as ModernBERT's own training: the MLPs, embeddings and head; attention has its kernels
        for module in [layer.mlp for layer in model.model.layers] + [model.model.embeddings, model.head]:
            module.compile(dynamic=True)
    for layer in model.model.layers:
        if cfg.activation_checkpointing:
            checkpoint_activations(layer)
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "encode")
    # the loss below is already normalised by the masked-token count of the whole global batch, so the
    # gradient reduction across ranks must sum, not average
    model.set_gradient_divide_factor(1.0)
    model.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas, cfg.eps, device.type)

    loader = data.Loader(cfg.data_dir, split="train", batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_seqlen=cfg.max_seqlen, rank=rank, world_size=world, seed=cfg.seed, mode=cfg.mode,
                         mlm_probability=cfg.mlm_probability, shuffle=True, verify=False, tokenizer=tokenizer)
    step = 0
    if resume:
        meta = json.loads((resume / "meta.json").read_text())
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=resume)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        # the loader state is the same on every rank (a position in the global sample stream), so a run may
        # resume on another number of processes; only the RNG streams (dropout) then restart from rank 0's
        own = torch.load(resume / f"rank{rank if meta['world_size'] == world else 0}.pt", weights_only=True)
        loader.load_state_dict(own["loader"])
        torch.set_rng_state(own["rng"]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(own["rng"]["cuda"], device)
        step = meta["step"]
        changed = {k: (meta["config"].get(k), v) for k, v in asdict(cfg).items()
                   if json.dumps(meta["config"].get(k)) != json.dumps(v)}
        log(f"resuming from {resume} at step {step}" + (f"; config changed since: {changed}" if changed else "")
            + (f"; written by {meta['world_size']} processes, now {world}" if meta["world_size"] != world else ""))
        if master:  # lines past the checkpoint are about to be recomputed; a kill may have cut the last one short
            path = out_dir / "metrics.jsonl"
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            path.write_text("".join(l for l in lines if l.endswith("\n") and json.loads(l)["step"] <= step))
    start = step
    metrics_file = open(out_dir / "metrics.jsonl", "a") if master else None
    log(f"{grad_accum} micro-steps of {cfg.micro_batch_size} sequences x {world} processes = {cfg.batch_size} "
        f"sequences of <= {cfg.max_seqlen} tokens per step; {cfg.max_steps} steps; {dtype} compute")

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
        final = out_dir / f"ckpt_{step}"
        tmp = out_dir / f"ckpt_{step}.tmp"
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        torch.save({"loader": loader.state_dict(), "rng": rng}, tmp / f"rank{rank}.pt")
        if master:
            meta = {"step": step, "world_size": world, "commit": commit, "config": asdict(cfg),
                    "model_config": asdict(mconf)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        dist.barrier()  # every rank's files are written
        if master:
            os.rename(tmp, final)
            for old in checkpoints(out_dir)[:-cfg.keep_last]:
                shutil.rmtree(old)
        dist.barrier()
        log(f"step {step}: saved {final}")

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
    batches = iter(loader)
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
        assert len(micro_batches) == grad_accum, f"loader gave {len(micro_batches)} micro-batches, expected {grad_accum}"
        n_masked = [int((mb["labels"] != -100).sum()) for mb in micro_batches]
        seqlens = [l for mb in micro_batches for l in torch.diff(mb["cu_seqlens"]).tolist()]
        flops = 3 * model.flops_per_token(seqlens, sum(n_masked)) * sum(seqlens)
        counts = torch.tensor([sum(n_masked), sum(seqlens), flops], dtype=torch.float64, device=device)
        dist.all_reduce(counts)  # over all ranks: masked tokens, real tokens, model FLOPs of this step
        total_masked = counts[0].item()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb, n in zip(micro_batches, n_masked):
            _, loss = model(mb["input_ids"].to(device), labels=mb["labels"].to(device),
                            cu_seqlens=mb["cu_seqlens"].to(device), max_seqlen=mb["max_seqlen"])
            # mean over the masked tokens of the global batch, however it is split into micro-batches and ranks
            (loss * (n / max(total_masked, 1))).backward()
            loss_sum += loss.detach().double() * n
        dist.all_reduce(loss_sum)
        loss = (loss_sum / max(total_masked, 1)).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).full_tensor().item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = checkpoints(out_dir)
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
        if step % cfg.log_every == 0 or step == 1:
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
        export_hf(final, out_dir / "hf", cfg.tokenizer, meta)
        log(f"saved the final model to {out_dir / 'hf'}")
    if run_wandb:
        run_wandb.finish()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # missing or mismatched shards, tokenizer, eval files
        fail(str(e))
