"""
Training checkpoints: where they live, how they are written, verified and read, and their Hugging Face export.

    out_dir/ckpt_STEP/
        .metadata, __R_0.distcp   model and AdamW state (torch.distributed.checkpoint: readable by any number of
                                  processes, or by one without a process group)
        rank{R}.pt                process R's data-loader position and RNG state
        meta.json                 step, world size, run config, model config, commit, and the size and CRC-32
                                  of every other file

A checkpoint is written as ckpt_STEP.tmp/ and renamed once all of it, meta.json last, is on disk: a kill
while saving leaves only a .tmp directory, which the next run removes. Each process checksums the files it
wrote, and rank 0 writes them all into meta.json. Before a checkpoint is used, its files are checked against
meta.json, so a truncated, altered or incomplete one is reported in one line and never loaded; on several
processes rank 0 lists the checkpoints and reads meta.json, each process checks a share of the files, and
the verdicts are combined, so every process loads the same one. Old checkpoints are renamed to
ckpt_STEP.trash-N and then removed; a file that cannot be removed yet (open elsewhere on a network
filesystem) stays until a later run removes it. CRC-32 rather than a cryptographic hash: it catches damage,
not tampering, at ~2 GB/s.

A checkpoint may come from someone else, so reading one runs nothing it holds: dcp's .metadata is a pickle,
read here by an unpickler that admits only the types DCP metadata is made of, and the optimizer's non-tensor
values are unpickled as data only (torch.load's weights_only), as rank{R}.pt is; meta.json is JSON. A save
that fails for lack of space (or quota, or a read-only filesystem) removes its .tmp and is one line naming
the step, the free space, what a checkpoint needs and the last good checkpoint.
"""
import errno
import json
import os
import pickle
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

import data
import ranks
from model import ModernBERT, ModernBertConfig
from ranks import Problem

META = "meta.json"
NAME = re.compile(r"ckpt_(\d+)")


def list_checkpoints(out_dir):
    """The ckpt_STEP directories of a run, oldest first (not yet verified)."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*") if (m := NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def step_of(path):
    return int(NAME.fullmatch(Path(path).name).group(1))


def crc32(path, chunk=16 << 20):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def read_meta(path):
    """meta.json of a checkpoint, or Problem saying what is wrong with it."""
    file = Path(path) / META
    if not file.is_file():
        raise Problem(f"{path}: no {META} (incomplete checkpoint)")
    text = file.read_text(errors="replace")
    if not text.strip():
        raise Problem(f"{file}: empty")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise Problem(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    missing = [k for k in ("step", "world_size", "config", "model_config", "files") if k not in meta] \
        if isinstance(meta, dict) else ["all keys"]
    if missing:
        raise Problem(f"{file}: lacks {', '.join(missing)}")
    return meta


def verify(path):
    """meta.json of a checkpoint whose every file has the size and CRC-32 it records; otherwise Problem
    naming the first damaged file. Collective when a process group exists: rank 0 reads meta.json, each process
    checks a share of the files, and every process gets the same answer."""
    path = Path(path)
    try:
        meta, problems = (read_meta(path) if ranks.rank() == 0 else None), []
    except Problem as e:
        meta, problems = None, [str(e)]
    meta, problems = ranks.from_rank0((meta, problems))
    try:
        for name in ranks.share(sorted(meta["files"])) if meta else []:
            want, file = meta["files"][name], path / name
            if not file.is_file():
                problems.append(f"{file}: missing")
            elif file.stat().st_size != want["size"]:
                problems.append(f"{file}: {file.stat().st_size} bytes, {META} records {want['size']}")
            elif (crc := crc32(file)) != want["crc32"]:
                problems.append(f"{file}: CRC-32 {crc}, {META} records {want['crc32']} (altered)")
    except (TypeError, KeyError, AttributeError) as e:  # every process must reach the gather below
        problems.append(f"{path / META}: malformed ({type(e).__name__}: {e})")
    except OSError as e:
        problems.append(f"{path}: {e}")
    problems = sorted(set(ranks.gather(problems)))
    if problems:
        raise Problem(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return meta


def latest(out_dir, report=print):
    """(newest checkpoint of out_dir that verifies, its meta) or (None, None), the same on every process (rank 0
    lists them); each newer one that does not verify is reported in one line and left in place."""
    for path in reversed(ranks.from_rank0(list_checkpoints(out_dir))):
        try:
            return path, verify(path)
        except Problem as e:
            report(f"skipping checkpoint {e}")
    return None, None


def discard(path):
    """Remove a directory without ever failing a run: renamed out of the way first (a name list_checkpoints skips),
    then removed as far as possible; what remains (a file still open elsewhere) goes with a later remove_partial."""
    trash = path.with_name(f"{path.name}.trash-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def remove_partial(out_dir):
    """Remove checkpoints whose writing was interrupted (ckpt_STEP.tmp) and what discard() left."""
    for leftover in [*Path(out_dir).glob("ckpt_*.tmp"), *Path(out_dir).glob("ckpt_*.trash-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def save(out_dir, step, model, optimizer, own, meta, keep_last):
    """Write ckpt_STEP: the sharded model and optimizer, this process's `own` state (loader, RNG), and meta.json
    with every file's size and CRC-32; then keep only the newest keep_last checkpoints. Collective. A save that
    fails for lack of space (or quota, a read-only or failing filesystem) removes ckpt_STEP.tmp and is one
    Problem on every process. -> (path, seconds spent on checksums)."""
    rank = dist.get_rank()
    final, tmp = Path(out_dir) / f"ckpt_{step}", Path(out_dir) / f"ckpt_{step}.tmp"
    if rank == 0 and tmp.exists():
        discard(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    t0, mine = time.perf_counter(), None
    try:
        written = dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save(own, tmp / f"rank{rank}.pt")
        # each process checksums the files it wrote (named __RANK_N.distcp by dcp, still in its page cache), not a
        # listing of the directory, which another node may see late on a network filesystem; rank 0 gathers them
        data_files = sorted({info.relative_path for info in written.storage_data.values()})
        t0 = time.perf_counter()
        names = [n for n in data_files if n.startswith(f"__{rank}_")] + [f"rank{rank}.pt"] + [".metadata"] * (rank == 0)
        mine = {n: {"size": (tmp / n).stat().st_size, "crc32": crc32(tmp / n)} for n in names}
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:  # dcp's fails on every process at once
        failed = e
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine if mine is not None else (rank, *_cause(failed)))  # every process must get here
    hashing = time.perf_counter() - t0
    failures, committing = [p for p in parts if isinstance(p, tuple)], None
    if rank == 0 and not failures:
        files = {name: entry for part in parts for name, entry in part.items()}
        expected = {*data_files, ".metadata", *(f"rank{r}.pt" for r in range(len(parts)))}
        assert files.keys() == expected, sorted(expected ^ files.keys())  # a file no process claims
        try:
            with open(tmp / META, "w") as f:
                json.dump({**meta, "step": step, "world_size": len(parts), "files": files}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes the checkpoint visible
            if final.exists():  # a damaged checkpoint of this step, skipped when the run resumed
                discard(final)
            os.rename(tmp, final)
        except OSError as e:
            failed, committing = e, (0, *_cause(e))
    if committing := ranks.from_rank0(committing):
        failures.append(committing)
    if not failures:
        if rank == 0:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                discard(old)
        dist.barrier()
        return final, hashing
    message = None
    if rank == 0:  # every process is done writing; rank 0 words the failure for all, so that they stop together
        discard(tmp)
        message = _save_failure(out_dir, step, final, keep_last, failures, [model_state, optim_state])
    if message := ranks.from_rank0(message):
        raise Problem(message)
    if mine is None or committing and rank == 0:
        raise failed  # no cause for people to act on: a bug's traceback
    raise Problem("")  # the process that failed says why


def _save_failure(out_dir, step, final, keep_last, failures, state):
    """The line for people about a save that failed: for lack of space, the free space, what a checkpoint needs
    and what to do; for another error of the filesystem, that error; None for anything else (a bug)."""
    last = list_checkpoints(out_dir)
    need = (checkpoint_size(last[-1]) if last else None) or state_bytes(state)
    free = shutil.disk_usage(out_dir).free
    codes = [code for _, code, _ in failures if code]
    last = f"the last good checkpoint is {last[-1] if last else 'none'}"
    if set(codes) & NO_SPACE.keys() or (not codes and free < need):  # no errno: what torch.save's writer leaves
        reason = NO_SPACE[next((c for c in codes if c in NO_SPACE), errno.ENOSPC)]
        return (f"step {step}: could not save {final}: {reason} (out_dir {out_dir} has {_size(free)} free, a "
                f"checkpoint needs {_size(need)}); {last}: free space or lower keep_last ({keep_last} now), then rerun "
                f"to resume from it")
    if codes:
        rank, _, what = next(f for f in failures if f[1])
        return f"step {step}: could not save {final}: {what} (rank {rank}); {last}"
    return None


NO_SPACE = {errno.ENOSPC: "out of space", errno.EDQUOT: "over the disk quota", errno.EROFS: "a read-only filesystem"}


def _cause(e):
    """(errno, one line) of the OSError behind a failed write (through dcp's per-process failures and chained
    exceptions), or (None, the first line of e). A write into a full disk inside torch.save may surface only as a
    RuntimeError of its zip writer ("unexpected pos"), without an errno."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return x.errno, f"{x.strerror}: {x.filename}" if x.filename else x.strerror
        if isinstance(x, dcp.api.CheckpointException):
            todo += [failure for failure, _ in x.failures.values()]
        todo += [x.__cause__, x.__context__]
    lines = str(e).splitlines() or [type(e).__name__]
    # dcp's exception reads as its processes' tracebacks, each ending with what failed
    return None, lines[-1] if isinstance(e, dcp.api.CheckpointException) else lines[0]


def _size(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def state_bytes(state):
    """Bytes of the tensors in a (nested) state: what writing it takes, before any file shows it."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()  # a DTensor's numel is the whole tensor's
    if isinstance(state, dict):
        return sum(map(state_bytes, state.values()))
    return sum(map(state_bytes, state)) if isinstance(state, (list, tuple)) else 0


def checkpoint_size(path):
    """Bytes of a checkpoint as its meta.json records them, or None."""
    try:
        return sum(entry["size"] for entry in read_meta(path)["files"].values()) + (Path(path) / META).stat().st_size
    except (Problem, OSError, TypeError, KeyError, AttributeError):
        return None


def space_warning(out_dir, keep_last, model, step=None):
    """A warning line when out_dir's free space cannot hold the checkpoints to keep, else None. A checkpoint is the
    size of the newest in out_dir or, before the first, of the model's state (the tied decoder weight counted
    again, as dcp writes it) and AdamW's two moments. At start: keep_last + 1 of them (the oldest is removed once
    the newest is complete), the checkpoints there counting as free space; before saving `step`: that one."""
    sizes = [size for size in map(checkpoint_size, list_checkpoints(out_dir)) if size]
    size = sizes[-1] if sizes else state_bytes(model.state_dict()) + 2 * state_bytes(list(model.parameters()))
    free = shutil.disk_usage(out_dir).free
    if step is None and free + sum(sizes) < (keep_last + 1) * size:
        return (f"warning: out_dir {out_dir} has {_size(free)} free" + (f" and {_size(sum(sizes))} in checkpoints"
                if sizes else "") + f", but the {keep_last + 1} checkpoints a run holds while saving (keep_last "
                f"{keep_last} + 1) need {_size((keep_last + 1) * size)}, {_size(size)} each: saving will fail; free "
                f"space or lower keep_last")
    if step is not None and free < size:
        return (f"warning: step {step}: out_dir {out_dir} has {_size(free)} free, a checkpoint needs {_size(size)}: "
                f"this save will likely fail")
    return None


# -----------------------------------------------------------------------------------------------------------
# reading a checkpoint from elsewhere: data only

# What a .metadata pickle may name: the globals the checkpoints of this project reference (listed from real ones,
# written on 1 and 2 processes), the rest of DCP's metadata classes, torch's dtypes and plain containers; each is
# a constructor of data whatever its arguments. Anything else (os.system, an import) is refused.
_DCP = "torch.distributed.checkpoint."
METADATA_GLOBALS = {
    *((_DCP + "metadata", name) for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                             "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                             "_MEM_FORMAT_ENCODING")),
    (_DCP + "filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),  # a layout is pickled as its name
    *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
    *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "PurePosixPath")),
    *(("builtins", name) for name in ("set", "frozenset", "bytearray")), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, file):
        super().__init__(f)
        self.file = file

    def find_class(self, module, name):
        if (module, name) not in METADATA_GLOBALS:
            raise Problem(f"{self.file}: refused {module}.{name}, not a type checkpoint metadata is made of "
                          f"(loading it could run code); nothing of this checkpoint is used")
        return super().find_class(module, name)


def read_dcp_metadata(path):
    """The Metadata of a checkpoint's .metadata, unpickled without running anything it holds; otherwise
    Problem naming the file and what it tried to load."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f, file).load()
    except Problem:
        raise
    except FileNotFoundError:
        raise Problem(f"{file}: missing") from None
    except Exception as e:  # only the constructors above ran: a malformed file, not a bug here
        what = type(e).__name__ + (f": {str(e).splitlines()[0]}" if str(e).strip() else "")
        raise Problem(f"{file}: unreadable ({what})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise Problem(f"{file}: holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in metadata.storage_data.values():  # the data files dcp will open: this directory's own only
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
            raise Problem(f"{file}: names the data file {name!r}, not a file of {path}")
    return metadata


class Reader(FileSystemReader):
    """dcp's filesystem reader with the .metadata read by read_dcp_metadata, once, when it is made: a checkpoint
    that would run code stops before dcp.load begins."""

    def __init__(self, path):
        super().__init__(path)
        self.metadata = read_dcp_metadata(path)

    def read_metadata(self, *args, **kwargs):
        self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does
        return self.metadata


class Planner(DefaultLoadPlanner):
    """dcp's default load planner, except that the non-tensor values (the optimizer's learning rate, betas, ...)
    are unpickled as data only: dcp's own load_bytes runs a full torch.load on them."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's message goes on to say how to load it anyway: not here
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = found.group(1) if found else "what torch.load(weights_only=True) refuses"
            raise Problem(f"{self.path}: refused the value of {read_item.dest_index.fqn}: it loads {what}, "
                          f"not plain data (loading it could run code); nothing of this checkpoint is used") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(state, path, no_dist=False):
    """dcp.load of a checkpoint through Reader and Planner; what they refuse is a Problem on every process
    (agreed on before dcp.load's collectives start, when there is a process group)."""
    try:
        reader, problems = Reader(path), []
    except Problem as e:
        reader, problems = None, [str(e)]
    if not no_dist:
        problems = ranks.gather(problems)
    if problems:
        raise Problem(problems[0])
    try:
        dcp.load(state, storage_reader=reader, planner=Planner(path), no_dist=no_dist)
    except dcp.api.CheckpointException as e:  # one process's failure, reported on all
        refused = [x for x, _ in e.failures.values() if isinstance(x, Problem)]
        if refused:
            raise Problem(str(refused[0])) from None
        raise


def load(path, model, optimizer):
    """Model and optimizer state of a verified checkpoint into a sharded model; -> this process's own state
    (rank 0's when the checkpoint was written by another number of processes). Collective."""
    meta = read_meta(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    _dcp_load({"model": model_state, "optim": optim_state}, path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    rank = dist.get_rank() if meta["world_size"] == dist.get_world_size() else 0
    return torch.load(Path(path) / f"rank{rank}.pt", weights_only=True)


def config_differences(theirs, mine):
    """{key: (theirs, mine)} where two model configs (dicts) differ. global_attn_every_n_layers is compared as the
    list of global layers it gives, since a config.json stores only that (2 and 3 are the same for 2 layers)."""
    def normal(c):
        c = dict(c)
        every = c.pop("global_attn_every_n_layers", None)
        c["global_layers"] = [i for i in range(c.get("num_hidden_layers", 0)) if every and i % every == 0]
        return c
    theirs, mine = normal(theirs), normal(mine)
    return {k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)}


# -----------------------------------------------------------------------------------------------------------
# weights for evaluation, initialisation and export


def resolve(path):
    """A model directory -> ("hf", dir) for Hugging Face (config.json) or ("ckpt", dir) for a training checkpoint
    (meta.json). A run directory stands for its final export hf/, else its newest complete checkpoint."""
    p = Path(path)
    if not p.is_dir():
        raise Problem(f"{path}: no such directory")
    if (p / "config.json").is_file():
        return "hf", p
    if (p / META).is_file() or NAME.fullmatch(p.name):
        return "ckpt", p
    if (p / "hf" / "config.json").is_file():
        return "hf", p / "hf"
    complete = [c for c in list_checkpoints(p) if (c / META).is_file()]  # verified when loaded
    if complete:
        return "ckpt", complete[-1]
    raise Problem(f"{path}: neither a Hugging Face model directory (config.json), a checkpoint (meta.json) "
                  f"nor a run directory (hf/ or ckpt_STEP/)")


def load_weights(model, path):
    """Weights of a verified checkpoint into an unsharded model (works without a process group)."""
    state = get_model_state_dict(model)
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process", as intended
            warnings.simplefilter("ignore", UserWarning)
            _dcp_load({"model": state}, path, no_dist=not dist.is_initialized())
    except (RuntimeError, ValueError, KeyError, dcp.api.CheckpointException) as e:
        raise Problem(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    set_model_state_dict(model, state)


def load_model(path):
    """-> (ModernBERT of a Hugging Face directory, checkpoint or run directory, the tokenizer file it names)."""
    kind, where = resolve(path)
    if kind == "hf":
        try:
            return ModernBERT.from_pretrained(where), where / "tokenizer.model"
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise Problem(str(e).splitlines()[0]) from None
    meta = verify(where)
    model = ModernBERT(ModernBertConfig(**meta["model_config"]))
    load_weights(model, where)
    return model, Path(meta["config"]["tokenizer"])


def export_hf(model, out, tokenizer_path, meta, normalize=True):
    """A model directory that transformers and sentence-transformers open as it is, as a released encoder:
        config.json, model.safetensors     the weights (transformers' ModernBertForMaskedLM)
        tokenizer.model                    the sentencepiece model (what this project reads)
        tokenizer.json, tokenizer_config.json   the same tokenizer for transformers' AutoTokenizer (same ids)
        modules.json, sentence_bert_config.json, 1_Pooling/, 2_Normalize/   sentence-transformers: mean pooling
                                           over <CLS> text <SEP> up to the model's positions, then L2 (unless
                                           normalize=False): the embeddings of evaluate.py
        training.json                      which run, config and commit
    Every file is written whole or not at all. -> the tokenizer file when it is missing (the model is written
    without a tokenizer), else None."""
    out = Path(out)
    model.save_pretrained(out)
    positions, hidden = model.config.max_position_embeddings, model.config.hidden_size
    if tokenizer_path and Path(tokenizer_path).is_file():
        tok = data.Tokenizer(tokenizer_path)
        data.write_atomic(out / "tokenizer.model", Path(tokenizer_path).read_bytes())
        for name, obj in data.hf_tokenizer(tok, positions).items():
            _write_json(out / name, obj)
        missing = None
    else:
        missing = tokenizer_path
    # sentence-transformers' long-standing layout (module paths under sentence_transformers.models), which
    # every release of it reads, so the directory drops into MTEB, JMTEB and older pipelines alike
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")] + [("Normalize", "2_Normalize")] * normalize
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": positions, "do_lower_case": False})
    (out / "1_Pooling").mkdir(exist_ok=True)
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True})
    if normalize:
        (out / "2_Normalize").mkdir(exist_ok=True)
    elif (out / "2_Normalize").is_dir():
        shutil.rmtree(out / "2_Normalize")
    _write_json(out / "config_sentence_transformers.json", {"prompts": {}, "default_prompt_name": None,
                                                             "similarity_fn_name": "cosine"})
    _write_json(out / "modules.json", [{"idx": i, "name": str(i), "path": path,
                                        "type": f"sentence_transformers.models.{kind}"}
                                       for i, (kind, path) in enumerate(modules)])
    _write_json(out / "training.json", {k: v for k, v in meta.items() if k != "files"})
    return missing


def _write_json(path, obj):
    data.write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))
