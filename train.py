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
`--export` writes a checkpoint in the same format, to DIR or to out_dir/hf_STEP.

On several processes and nodes, `main` runs four phases: setup (every rank checks the config and its inputs,
then the ranks agree; out_dir must be one directory that every rank sees), resume, the loop, finish. A problem
on any rank stops the whole job with one line from that rank, `error: rank R (HOST): ...`, which torchrun's
summary repeats. A watchdog ends a job that stops making progress (a dead, stuck or unreachable rank) after
`collective_timeout` seconds with a line naming the step and the ranks not heard from.
"""
import ast
import contextlib
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import re
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import checkpoint
import data
from evaluate import by_budget, embed, read_miracl_pairs, recall_mrr
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
    micro_batch_size: int = 16   # sequences per process per forward/backward, unless micro_batch_tokens is set
    micro_batch_tokens: int = 0  # > 0: micro-batches of at most this many tokens instead (>= max_seqlen)
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
    collective_timeout: int = 600  # seconds without progress (a rank dead or stuck) before the job stops, naming it
    wandb: bool = False          # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "llm-jp-modernbert"  # Weights & Biases project


CHOICES = {"mode": ("line_by_line", "packed"), "dtype": ("auto", "float32", "bfloat16")}
POSITIVE = ("max_steps", "log_every", "checkpoint_every", "keep_last", "batch_size", "micro_batch_size", "max_seqlen",
            "collective_timeout")
# bf16 dense peak per GPU, for MFU; other devices report mfu as null
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DTYPES = {"auto": lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
          "float32": lambda device: torch.float32, "bfloat16": lambda device: torch.bfloat16}
EMPTY_WARNING = 0.25  # share of empty micro-batches above which the start of a run warns
PLANNED = 8           # global batches whose micro-batches are planned at start to estimate that share


# -----------------------------------------------------------------------------------------------------------
# errors: one line for people, from the rank that found the problem


class Stop(Exception):
    """A problem for people: the run ends with exit code 1 and this one line (none when the message is empty: another
    rank prints the reason)."""


def where():
    """`rank R (HOST): ` under torchrun, so that a line says which process of which node wrote it."""
    return f"rank {os.environ['RANK']} ({socket.gethostname()}): " if "RANK" in os.environ else ""


def stop(message, log_file=None, now=False):
    """Print `error: ...`, hand the line to torchrun (its summary names this rank and shows it instead of `error_file:
    <N/A>`) and exit 1; `now` (the watchdog's thread, broken collectives) skips Python's teardown, which could wait."""
    if message:
        line = f"error: {where()}{message}"
        print(line, file=sys.stderr, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()
        if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):  # a plain "message" is shown as it is
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    if now or "RANK" in os.environ:  # under torchrun: leave at once, so that it ends the job
        os._exit(1)
    sys.exit(1)


def agree(problem):
    """Every rank's problem (a string, or None) is gathered; if any rank has one, that rank prints it (the lowest
    rank with it on each host), rank 0 also names the rank that stops the job, and every rank stops. Collective: the
    first one after the process group starts, so a rank missing an input stops all of them in seconds."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, (socket.gethostname(), problem))
    if not any(p for _, p in found):
        return
    rank = dist.get_rank()
    if problem and found.index(found[rank]) == rank:
        raise Stop(problem)
    if rank == 0 and not problem:
        first = next(r for r, (_, p) in enumerate(found) if p)
        raise Stop(f"stopped by rank {first} ({found[first][0]}): {found[first][1].splitlines()[0]}")
    raise Stop("")


# -----------------------------------------------------------------------------------------------------------
# processes: the watchdog


class Watchdog:
    """Every rank's heartbeat and place (step, phase) in the job's c10d store (MASTER_ADDR:MASTER_PORT), and a
    monitor: a rank whose own work has not moved for `limit` seconds (it waits in a collective for a rank that is
    dead, stuck or unreachable) prints one line naming its step and the ranks not heard from, and exits, so that
    torchrun ends the job. The limit is a little under the process group's timeout, which on NCCL aborts the
    process without a word."""

    def __init__(self, rank, world, timeout):
        self.rank, self.world = rank, world
        self.limit = timeout - min(10.0, timeout / 10)
        self.beat = min(10.0, timeout / 10)  # seconds between heartbeats
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=max(self.beat, 5)))
        # keys of this attempt only (torchrun may keep its store over restarts): a name chosen by rank 0
        name = [secrets.token_hex(4)]
        dist.broadcast_object_list(name)
        self.store = dist.PrefixStore(f"train.py/{name[0]}/", store)
        self.host, self.step, self.phase, self.moved = socket.gethostname(), 0, "setup", time.monotonic()
        self.patience = 0  # > 0 while in patient()
        self.log_file, self.done, self.lock = None, threading.Event(), threading.Lock()
        self.send()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def at(self, step, phase):
        """This rank's work moved: now at `step`, doing `phase`."""
        self.step, self.phase, self.moved = step, phase, time.monotonic()

    @contextlib.contextmanager
    def patient(self, phase):
        """Long local work (hashing the shards, building the demo data), during which no stall is reported."""
        self.at(self.step, phase)
        self.patience += 1
        try:
            yield
        finally:
            self.patience -= 1
            self.at(self.step, phase)

    def send(self):
        self.store.set(f"beat/{self.rank}", json.dumps({"host": self.host, "step": self.step, "phase": self.phase,
                                                        "time": time.time()}))

    def watch(self):
        sent = time.monotonic()
        while not self.done.wait(min(1.0, self.beat)):
            if time.monotonic() - sent >= self.beat:
                sent = time.monotonic()
                try:
                    self.send()
                except Exception:  # the store's node is gone: torchrun is ending the job; keep watching this rank
                    pass
            if not self.patience and time.monotonic() - self.moved > self.limit:
                self.fail(f"no progress for {time.monotonic() - self.moved:.0f} s")

    def silent(self, older_than):
        """[(rank, description)] of the other ranks last heard from more than `older_than` seconds ago."""
        found = []
        for r in range(self.world):
            if r == self.rank:
                continue
            if not self.store.check([f"beat/{r}"]):
                found.append((r, f"rank {r} (never heard from)"))
                continue
            beat = json.loads(self.store.get(f"beat/{r}"))
            if time.time() - beat["time"] > older_than:
                found.append((r, f"rank {r} ({beat['host']}, last heard {time.time() - beat['time']:.0f} s ago, at "
                                 f"step {beat['step']}, {beat['phase']})"))
        return found

    def fail(self, what, stalled=True):
        """Print this rank's step and the ranks not heard from, and exit 1. From any thread: the first call ends the
        process, a second one waits for that."""
        self.lock.acquire()
        try:
            silent = [d for _, d in self.silent(older_than=min(self.limit / 2, 3 * self.beat))]
            others = (f"; not heard from: {', '.join(silent[:8])}" + (f" and {len(silent) - 8} more" if len(silent) > 8
                      else "")) if silent else "; every other rank is still heard from" if stalled else ""
        except Exception as e:  # the store itself does not answer
            others = f"; the c10d store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is silent ({e})"
        stop(f"step {self.step} ({self.phase}): {what}{others}", self.log_file, now=True)

    def barrier(self, name, most=24 * 3600):
        """Wait for every rank to reach this point, through the store rather than a collective, for waits that may
        take hours (the first verification of a corpus): as long as each rank not there yet is still heard from,
        and at most `most` seconds."""
        self.store.set(f"{name}/{self.rank}", "1")
        keys, start = [f"{name}/{r}" for r in range(self.world)], time.monotonic()
        with self.patient(f"waiting for every rank: {name}"):
            while not self.store.check(keys):
                if any(not self.store.check([keys[r]]) for r, _ in self.silent(older_than=self.limit)):
                    self.fail(f"a rank stopped before {name}")
                if time.monotonic() - start > most:
                    late = [r for r in range(self.world) if not self.store.check([keys[r]])]
                    self.fail(f"ranks {', '.join(map(str, late[:8]))} not done after {most / 3600:.0f} h")
                time.sleep(min(1.0, self.beat))

    def close(self):
        """Stop the monitor and wait for it: a daemon thread still inside a store call when the interpreter exits
        aborts the process ("terminate called without an active exception")."""
        self.done.set()
        self.thread.join()


# -----------------------------------------------------------------------------------------------------------
# config


def find_config(arg):
    path = Path(arg)
    if path.is_file():
        return path
    for name in (path.name, path.name + ".py"):
        if (REPO / "configs" / name).is_file():
            return REPO / "configs" / name
    raise Stop(f"config {arg}: no such file, nor configs/{path.name}")


def set_key(cfg, key, value, where):
    types = {f.name: f.type for f in fields(Config)}
    if key not in types:
        raise Stop(f"{where}: unknown config key {key!r}")
    want = types[key]
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise Stop(f"{where}: config key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise Stop(f"{where}: config key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value < 1:
        raise Stop(f"{where}: config key {key!r} must be at least 1, got {value}")
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
        raise Stop(f"{path}:{e.lineno}: {e.msg}")
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if f.filename == str(path)), "?")
        raise Stop(f"{path}:{line}: {type(e).__name__}: {e}")
    for key, value in namespace.items():
        if not key.startswith("__"):
            set_key(cfg, key, value, f"{path}:{lines.get(key, '?')}")
    for arg in args[1:]:
        match = re.fullmatch(r"--(\w+)=(.*)", arg, re.S)
        if not match:
            raise Stop(f"command line: {arg!r} is not --key=value")
        key, raw = match.groups()
        want = {f.name: f.type for f in fields(Config)}.get(key)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string
        if want is str and not isinstance(value, str):
            value = raw  # --out_dir=123 means the string "123"
        set_key(cfg, key, value, "command line")
    known = {f.name for f in fields(ModernBertConfig)}
    for key in cfg.model_args:
        if key not in known:
            raise Stop(f"config key model_args: {key!r} is not a ModernBertConfig field")
        if key in FROM_TOKENIZER:
            raise Stop(f"config key model_args: {key!r} comes from the tokenizer, not the config")
    if cfg.model not in PRESETS:
        raise Stop(f"config key model: unknown preset {cfg.model!r} (known: {', '.join(PRESETS)})")
    try:
        ModernBertConfig.preset(cfg.model, **cfg.model_args)
    except (ValueError, TypeError, AssertionError) as e:
        raise Stop(f"config key model_args: {e}")
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
            missing.append(f"data_dir {located(cfg.data_dir)}: make it with python data.py prepare --input "
                           f"'CORPUS/*.jsonl' --tokenizer {cfg.tokenizer} --out {cfg.data_dir}")
        if not Path(cfg.tokenizer).is_file():
            missing.append(f"tokenizer {located(cfg.tokenizer)}: put the llm-jp tokenizer there, or train one with "
                           f"python data.py tokenizer --input CORPUS.jsonl --vocab_size 100000 --out {cfg.tokenizer}")
        if cfg.retrieval_eval and not Path(cfg.retrieval_eval).is_file():
            missing.append(f"retrieval_eval {located(cfg.retrieval_eval)}: put MIRACL ja (train split, jsonl) there, "
                           f"or skip that evaluation with --retrieval_eval=''")
    if cfg.init_from and not Path(cfg.init_from).exists():
        writes = re.compile(rf"^out_dir\s*=\s*[\"']{re.escape(str(Path(cfg.init_from).parent))}[\"']", re.M)
        makers = [p for p in sorted((REPO / "configs").glob("*.py")) if writes.search(p.read_text())]
        how = (f"python train.py {makers[0].relative_to(REPO)}" if makers and Path(cfg.init_from).name == "hf"
               else "the final export (OUT_DIR/hf) of a training run, or a Hugging Face ModernBERT directory")
        missing.append(f"init_from {located(cfg.init_from)}: make it with {how}")
    return missing


def located(path):
    """A relative path with where it points from here (each node has its own working directory)."""
    return path if Path(path).is_absolute() else f"{path} (= {Path(path).absolute()})"


def batch_problem(cfg, world):
    """Why the global batch cannot be split over `world` processes, or None. Micro-batches of micro_batch_size
    sequences must divide it exactly; micro-batches by tokens (micro_batch_tokens) fit any number of processes."""
    if cfg.micro_batch_tokens:
        if cfg.micro_batch_tokens < cfg.max_seqlen:
            return f"micro_batch_tokens {cfg.micro_batch_tokens} is less than max_seqlen {cfg.max_seqlen}"
        return None
    if cfg.batch_size % (world * cfg.micro_batch_size):
        return divisibility(cfg.batch_size, world, cfg.micro_batch_size)
    return None


def divisibility(batch_size, world, micro_batch_size):
    fits = [m for m in range(1, batch_size // world + 1) if batch_size % (world * m) == 0]
    split = f"{world} processes x " if world > 1 else ""
    return (f"batch_size {batch_size} is not a multiple of {split}micro_batch_size {micro_batch_size}"
            + (f"; micro_batch_size can be {', '.join(map(str, fits))}" if fits else
               f"; batch_size must be a multiple of the {world} processes (or set micro_batch_tokens)"))


def check_inputs(cfg, config_path, world):
    """The first problem of these settings on `world` processes, or None: every missing input at once (each with how
    to make it), then what this machine lacks, then the batch split."""
    missing = missing_inputs(cfg, config_path)
    if len(missing) == 1:
        return f"{config_path}: input missing: {missing[0]}"
    if missing:
        return f"{config_path}: {len(missing)} inputs missing:\n  " + "\n  ".join(missing)
    if (os.environ.get("MODERNBERT_ATTENTION") == "kernels" and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        return "MODERNBERT_ATTENTION=kernels needs a CUDA GPU, and none is visible (on a CPU: TRITON_INTERPRET=1)"
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        return "config key wandb: True, but the wandb package is not installed (pip install wandb)"
    return batch_problem(cfg, world)


def open_inputs(cfg, config_path, rank, world):
    """This rank's tokenizer, training and validation loaders and retrieval pairs; Stop naming the first problem."""
    if problem := check_inputs(replace(cfg, demo_data=False), config_path, world):  # the demo data is built now
        raise Stop(problem)
    try:
        tokenizer = data.Tokenizer(cfg.tokenizer)
        loaders = [data.Loader(cfg.data_dir, split=split, batch_size=cfg.batch_size,
                               micro_batch_size=cfg.micro_batch_size, max_seqlen=cfg.max_seqlen, rank=rank,
                               world_size=world, seed=cfg.seed, mode=cfg.mode, mlm_probability=cfg.mlm_probability,
                               shuffle=split == "train", verify=False, tokenizer=tokenizer,
                               micro_batch_tokens=cfg.micro_batch_tokens) for split in ("train", "val")]
        pairs = read_miracl_pairs(cfg.retrieval_eval) if cfg.retrieval_eval else []
    except data.DataError as e:
        raise Stop(str(e)) from None
    except SystemExit as e:  # evaluate.py's one-line errors (a malformed retrieval file)
        raise Stop(str(e.code).removeprefix("error: ")) from None
    return tokenizer, *loaders, pairs


def prove_shared(out_dir, rank):
    """Rank 0 creates out_dir and writes a file of a new random name there, which every rank must read back (a name
    never looked up before cannot come from a stale cache of a network filesystem). -> this rank's problem, or None.
    Collective. Nothing stays behind: the file is removed, and out_dir too if rank 0 made it and a rank did not see
    it."""
    token, problem, made = secrets.token_hex(8), None, []
    if rank == 0:
        try:
            made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f".shared-{token}").write_text(socket.gethostname())
        except OSError as e:
            problem = f"out_dir {out_dir}: {e.strerror or e}"
    box = [(token, problem)]
    dist.broadcast_object_list(box)
    (token, problem0), probe = box[0], out_dir / f".shared-{box[0][0]}"
    if rank and not problem0:
        for _ in range(20):  # a few seconds for a network filesystem to show a new file
            try:
                probe.read_text()
                break
            except OSError:
                time.sleep(0.25)
        else:
            problem = (f"out_dir {out_dir} ({out_dir.resolve()}) is not the directory rank 0 writes to: the file "
                       f"rank 0 just wrote there ({probe.name}) is not here; every node must see out_dir at the same "
                       f"path on a shared filesystem")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, problem is None and problem0 is None)
    if rank == 0:
        probe.unlink(missing_ok=True)
        if not all(seen):
            for path in made:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()
    return problem


# -----------------------------------------------------------------------------------------------------------
# micro-batches by tokens: how many are empty


def empty_share(loader, budget, world, batch_size, batches=PLANNED):
    """(empty micro-batches, all micro-batches) when the first `batches` global batches are packed into micro-batches
    of at most `budget` tokens and dealt to `world` ranks (data.pack_by_tokens): every rank runs as many micro-steps,
    so a rank short of data computes a lone <CLS> <SEP> while the others learn."""
    empty = total = 0
    for k in range(batches):
        plan = data.pack_by_tokens(loader.sample_tokens(k * batch_size, batch_size), budget, world)
        empty += sum(1 for steps in plan for m in steps if len(m) == 0)
        total += sum(len(steps) for steps in plan)
    return empty, total


def micro_batch_report(loader, cfg, world):
    """One line: the share of empty micro-batches on `world` processes, and above EMPTY_WARNING what would fill them
    (smaller micro-batches, larger global batches, or fewer processes)."""
    empty, total = empty_share(loader, cfg.micro_batch_tokens, world, cfg.batch_size)
    line = (f"{empty / total:.0%} of the micro-batches of <= {cfg.micro_batch_tokens} tokens empty on {world} "
            f"processes (the first {PLANNED} global batches)")
    if empty / total <= EMPTY_WARNING:
        return line
    filled = (total - empty) / PLANNED  # micro-batches with data per global batch
    steps = total / PLANNED / world  # micro-steps each process runs
    budgets = range(cfg.micro_batch_tokens - cfg.max_seqlen, cfg.max_seqlen - 1, -cfg.max_seqlen)  # largest first
    smaller = next(((b, e / t) for b in budgets for e, t in [empty_share(loader, b, world, cfg.batch_size)]
                    if e / t <= EMPTY_WARNING), None)
    ways = ([f"lower micro_batch_tokens to {smaller[0]} ({smaller[1]:.0%} empty)"] if smaller else []) + [
        f"raise batch_size to about {math.ceil(cfg.batch_size * steps * world / filled)}"] + (
        [f"run on about {int(filled)} processes"] if filled < world else [])
    if smaller is None:
        e, t = empty_share(loader, cfg.max_seqlen, world, cfg.batch_size)
    return (f"warning: {line}: a global batch of {cfg.batch_size} sequences fills about {filled:.0f} micro-batches "
            f"and each process runs {steps:.0f}; to fill them, {', '.join(ways[:-1])} or {ways[-1]}"
            + ("" if smaller else f" (even micro_batch_tokens={cfg.max_seqlen} leaves {e / t:.0%} empty)"))


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
            target = labels[labels != -100]
            totals += torch.stack([loss.double() * len(target), (logits.argmax(-1) == target).sum().double(),
                                   torch.tensor(len(target), dtype=torch.float64, device=device)])
    dist.all_reduce(totals)
    return {"val_loss": (totals[0] / totals[2]).item(), "val_acc": (totals[1] / totals[2]).item()}


@torch.no_grad()
def evaluate_retrieval(run, model, step):
    """Zero-shot Recall@10 and MRR@10 as evaluate.retrieval_scores computes them, with the texts shared over the
    ranks: batches of at most a micro-batch's tokens, planned alike on every rank (longest texts first), dealt
    round-robin, as many to each rank (an empty text fills up: every rank takes part in every sharded forward);
    rank 0 gathers the embeddings and scores. -> the scores on rank 0, None elsewhere."""
    cfg, rank, world = run.cfg, run.rank, run.world
    texts = [q for q, _ in run.pairs] + [p for _, p in run.pairs]
    lengths = [len(run.tokenizer.encode_pair(t, max_len=cfg.retrieval_max_len)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    budget = cfg.micro_batch_tokens or cfg.micro_batch_size * cfg.max_seqlen
    batches = [[order[i] for i in group] for group in by_budget([lengths[i] for i in order], budget)]
    mine = batches[rank::world]
    part = {}
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate.py's progress lines are for its command line
        for group in mine + [[]] * (-(-len(batches) // world) - len(mine)):
            run.at(step, "evaluation")
            part.update(zip(group, embed(model, run.tokenizer, [texts[i] for i in group] or [""],
                                         cfg.retrieval_max_len, budget)))
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
        raise Stop("usage: python train.py --export CKPT_DIR [OUT_DIR]")
    ckpt = Path(args[0])
    meta = checkpoint.verify(ckpt)
    model = ModernBERT(ModernBertConfig(**meta["model_config"]))
    checkpoint.load_weights(model, ckpt)
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
    watchdog: Watchdog | None
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
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg, config_path = load_config(args)
        problem = check_inputs(cfg, config_path, world)
    except Stop as e:  # agreed on below: every rank stops, not only those that see it
        cfg, config_path, problem = Config(), None, str(e)
    if problem and "RANK" not in os.environ:  # one process: nobody to tell
        raise Stop(problem)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    timeout = timedelta(seconds=cfg.collective_timeout)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend, timeout=timeout)
        agree(problem)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    watchdog = Watchdog(rank, world, cfg.collective_timeout) if world > 1 else None
    run = Run(cfg, config_path, rank, world, device, watchdog, Path(cfg.out_dir))
    run.at(0, "checking out_dir")
    agree(prove_shared(run.out_dir, rank))

    if run.master and cfg.demo_data and not Path(cfg.data_dir).exists():  # = python data.py demo --out DIR
        print(f"{cfg.data_dir} is missing: building the demo data in {Path(cfg.data_dir).parent}", flush=True)
        with run.patient("building the demo data"):
            data.main(["demo", "--out", str(Path(cfg.data_dir).parent)])
    run.barrier("demo data")
    run.at(0, "opening the inputs")
    try:
        run.tokenizer, run.loader, run.val_loader, run.pairs = open_inputs(cfg, config_path, rank, world)
        problem = None
    except Stop as e:
        problem = str(e)
    agree(problem)
    run.val_start, run.mconf, run.commit = run.val_loader.state_dict(), model_config(cfg, run.tokenizer), git_commit()

    if run.master:
        checkpoint.remove_partial(run.out_dir)  # what a kill while saving or removing left
        run.log_file = open(run.out_dir / "log.txt", "a")
        if run.watchdog:
            run.watchdog.log_file = run.log_file
    run.log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} python train.py {' '.join(args)}")
    run.log(f"# commit {run.commit}; python {platform.python_version()}, torch {torch.__version__}; {world} x "
            f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {backend}")
    run.log("# config (" + str(config_path) + "):\n" + "\n".join(f"{k} = {v!r}" for k, v in asdict(cfg).items()))
    run.log("# model: " + ", ".join(f"{k}={v}" for k, v in asdict(run.mconf).items()))
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        run.log("warning: with --max-restarts, torchrun's store shared with the workers can give a restarted worker a "
                "peer's address from before the restart (it then fails to connect); run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    if cfg.warmup_steps >= cfg.max_steps:
        run.log(f"warning: warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate never "
                f"reaches lr {cfg.lr} nor decays")
    micro = (f"micro-steps of <= {cfg.micro_batch_tokens} tokens" if cfg.micro_batch_tokens else
             f"{cfg.batch_size // (world * cfg.micro_batch_size)} micro-steps of {cfg.micro_batch_size} sequences")
    run.log(f"{micro} x {world} processes = {cfg.batch_size} sequences of <= {cfg.max_seqlen} tokens per step; "
            f"{cfg.max_steps} steps; {DTYPES[cfg.dtype](device)} compute")
    if cfg.micro_batch_tokens and run.master:
        run.log(micro_batch_report(run.loader, cfg, world))
    return run


def resume(run):
    """The model (seeded, or init_from's weights), sharded, and its optimizer; then the newest checkpoint that
    verifies, one choice for every rank, loaded into them and into the loader; the shards verified meanwhile.
    -> (model, optimizer, step)"""
    cfg, rank, world, device = run.cfg, run.rank, run.world, run.device
    run.at(0, "choosing a checkpoint")
    ckpt, meta = checkpoint.latest(run.out_dir, report=run.log)
    changed = ckpt and checkpoint.config_differences(meta["model_config"], asdict(run.mconf))
    agree(f"{ckpt}: the model differs from this run's: " + ", ".join(
        f"{k} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items()) if changed else None)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, then sharded
    model, problem = ModernBERT(run.mconf), None
    if cfg.init_from and not ckpt:
        run.log(f"initialising weights from {cfg.init_from}")
        try:
            source, _ = checkpoint.load_model(cfg.init_from)
            if changed := checkpoint.config_differences(asdict(source.config), asdict(run.mconf)):
                problem = f"init_from {cfg.init_from}: the model differs from this run's: " + ", ".join(
                    f"{k} {a!r} there, {b!r} here" for k, (a, b) in changed.items())
            else:
                model.load_state_dict(source.state_dict())
        except checkpoint.CheckpointError as e:
            problem = f"init_from {e}"
    agree(problem)
    run.log(f"parameters: {model.num_params():,} ({model.num_params(embeddings=False):,} without the embedding)")
    if run.master and (warning := checkpoint.space_warning(run.out_dir, cfg.keep_last, model)):
        run.log(warning)
    parallelize(model.to(device), init_device_mesh(device.type, (world,)), DTYPES[cfg.dtype](device), cfg.compile,
                cfg.activation_checkpointing)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas, cfg.eps, device.type)

    # every shard is hashed once before its first use, this rank's share in the background meanwhile; out_dir
    # remembers what was verified, so a restart only stats the files
    verifying = data.verify_in_background(cfg.data_dir, run.out_dir, rank, world)
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
                   if json.dumps(meta["config"].get(k)) != json.dumps(v)}
        run.log(f"resuming from {ckpt} at step {step}" + (f"; config changed since: {changed}" if changed else "")
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
    agree(problem)
    return model, optimizer, step


def train(run, model, optimizer, step):
    """The loop: evaluation and checkpoint at the top of a step, then the micro-steps, clipping, the update and the
    log. -> the last step"""
    cfg, device, world, start = run.cfg, run.device, run.world, step
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
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
        micro_batches = next(batches)
        assert cfg.micro_batch_tokens or len(micro_batches) == cfg.batch_size // (world * cfg.micro_batch_size)
        # by token budget, every rank gets as many micro-batches, some empty (nothing to predict, not counted)
        n_masked = [int((mb["labels"] != -100).sum()) for mb in micro_batches]
        seqlens = [l for mb in micro_batches if not mb.get("empty") for l in torch.diff(mb["cu_seqlens"]).tolist()]
        flops = 3 * model.flops_per_token(seqlens, sum(n_masked)) * sum(seqlens)
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
            raise Stop(message if os.environ.get("LOCAL_RANK", "0") == "0" else "")
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
            run.record(entry)
            run.log(f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                    f"{tokens} tokens, {tokens / dt:,.0f} tokens/s"
                    + (f" | mfu {entry['mfu']:.1%}" if peak_flops else "") + f" | peak mem {entry['peak_mem']:.2f} GiB")
    progress.close()
    return step


def finish(run, model, step):
    """The final model in Hugging Face format (gathered to rank 0), then every rank leaves together."""
    run.at(step, "exporting the final model")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only
    if run.master:
        final = ModernBERT(run.mconf)
        final.load_state_dict(state)
        meta = {"step": step, "world_size": run.world, "commit": run.commit, "config": asdict(run.cfg),
                "model_config": asdict(run.mconf)}
        checkpoint.export_hf(final, run.out_dir / "hf", run.cfg.tokenizer, meta)
        run.log(f"saved the final model to {run.out_dir / 'hf'}")
        if run.wandb:
            run.wandb.finish()
    dist.barrier()
    if run.watchdog:
        run.watchdog.close()
    dist.destroy_process_group()


def main():
    args, run = sys.argv[1:], None
    try:
        if args[:1] == ["--export"]:
            return export(args[1:])
        if args[:1] in (["--help"], ["-h"]):
            return usage()
        if not args or args[0].startswith("--"):
            raise Stop("usage: python train.py CONFIG [--key=value ...]  |  python train.py --export CKPT_DIR "
                       "[OUT_DIR]  |  python train.py --help")
        run = setup(args)
        model, optimizer, step = resume(run)
        step = train(run, model, optimizer, step)
        finish(run, model, step)
    except (Stop, data.DataError, checkpoint.CheckpointError) as e:
        stop(str(e), run and run.log_file)
    except RuntimeError as e:  # gloo reports a lost rank or a timed-out collective as a plain RuntimeError
        if "RANK" not in os.environ or not (isinstance(e, dist.DistError) or "/gloo/" in str(e)):
            raise
        what = "a collective failed: " + re.sub(r"^\[[^]]*\] ", "", str(e).splitlines()[0]).split(". ")[0]
        if run and run.watchdog:
            run.watchdog.fail(what, stalled=False)
        stop(what, run and run.log_file)
    finally:  # a bug's traceback: the monitor thread must not be inside a store call as the interpreter exits
        if run and run.watchdog:
            run.watchdog.close()


if __name__ == "__main__":
    record(main)()  # a bug's traceback goes to torchrun's summary too, naming the rank that raised it
