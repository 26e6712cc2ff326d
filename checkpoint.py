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
"""
import json
import os
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

import data
import ranks
from data import _write_atomic
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
    with every file's size and CRC-32; then keep only the newest keep_last checkpoints. Collective.
    -> (path, seconds spent on checksums)."""
    rank = dist.get_rank()
    final, tmp = Path(out_dir) / f"ckpt_{step}", Path(out_dir) / f"ckpt_{step}.tmp"
    if rank == 0 and tmp.exists():
        discard(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    written = dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(own, tmp / f"rank{rank}.pt")
    # each process checksums the files it wrote (named __RANK_N.distcp by dcp, still in its page cache), not a
    # listing of the directory, which another node may see late on a network filesystem; rank 0 gathers them
    data_files = sorted({info.relative_path for info in written.storage_data.values()})
    t0 = time.perf_counter()
    mine = [n for n in data_files if n.startswith(f"__{rank}_")] + [f"rank{rank}.pt"] + [".metadata"] * (rank == 0)
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object({n: {"size": (tmp / n).stat().st_size, "crc32": crc32(tmp / n)} for n in mine}, parts)
    hashing = time.perf_counter() - t0
    if rank == 0:
        files = {name: entry for part in parts for name, entry in part.items()}
        expected = {*data_files, ".metadata", *(f"rank{r}.pt" for r in range(len(parts)))}
        assert files.keys() == expected, sorted(expected ^ files.keys())  # a file no process claims
        with open(tmp / META, "w") as f:
            json.dump({**meta, "step": step, "world_size": len(parts), "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes the checkpoint visible
        if final.exists():  # a damaged checkpoint of this step, skipped when the run resumed
            discard(final)
        os.rename(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            discard(old)
    dist.barrier()
    return final, hashing


def load(path, model, optimizer):
    """Model and optimizer state of a verified checkpoint into a sharded model; -> this process's own state
    (rank 0's when the checkpoint was written by another number of processes). Collective."""
    meta = read_meta(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
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
            dcp.load({"model": state}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
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
        _write_atomic(out / "tokenizer.model", Path(tokenizer_path).read_bytes())
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
    _write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))
