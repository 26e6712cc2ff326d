"""
Data for llm-jp-modernbert: tokenizer training, parallel sharding, and a memory-mapped MLM loader whose
batches depend on the seed alone.

    python data.py tokenizer --input corpus.jsonl --vocab_size 8000 --out tokenizer.model
    python data.py prepare --input 'corpus/*.jsonl.gz' --tokenizer tokenizer.model --out shards --workers 8

Inputs: .jsonl / .json (JSON lines, text in --text_field) and .txt (one document per line), each optionally
gzipped. Blank lines and empty texts are skipped.

Shards: every input chunk becomes `{split}-{NNNNN}-{hash}.bin` (the documents' tokens back to back, uint16
when the vocabulary fits, else uint32, stored without <CLS>/<SEP>: the loader adds them) and `.idx` (int64
document offsets, n_docs + 1), where hash names what the shard was made from (input, byte range,
tokenizer), so a rerun skips finished shards and never overwrites a shard an older manifest lists.
manifest.json records the tokenizer (file name, sha256, vocab size, special ids), the counts and every
shard's size and sha256. A document goes to the held-out "val" split iff the CRC-32 of its UTF-8 text is below
val_fraction * 2**32, so the split does not depend on file order, sharding or worker count.

Bad inputs are one-line errors naming file:line. A rerun skips finished shards; an output directory holding
another dataset is refused unless --replace. Before training, verify_shards checks every shard once against
the manifest and remembers it (train.py runs it in the background). The synthetic demo corpus lives in
demo.py (`python demo.py`, or `python data.py demo`).
"""
import argparse
import fcntl
import functools
import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import secrets
import re
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

FORMAT_VERSION = 1
SPECIAL_NAMES = ("MASK", "PAD", "CLS", "SEP", "EOD")


class DataError(Exception):
    """A problem with the user's data or files; the message is one line saying what and where."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path, data):
    """Write bytes or str to path via a temporary file and rename, so readers never see half a file. An
    identical file is left alone, keeping its modification time (shards made from it stay valid)."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

# ---------------------------------------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A sentencepiece model (ours or llm-jp's) with its special ids found by piece name."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path}: not a sentencepiece model ({str(e).strip().splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = {}
        for name in SPECIAL_NAMES:
            for piece in (f"<{name}>", f"<{name}|LLM-jp>"):
                i = self.sp.piece_to_id(piece)
                if self.sp.id_to_piece(i) == piece:  # piece_to_id answers unk_id for unknown pieces
                    ids[name] = i
                    break
            else:
                raise DataError(f"{path}: tokenizer has no <{name}> piece (needs the llm-jp special-piece layout)")
        self.mask_id, self.pad_id, self.cls_id, self.sep_id, self.eod_id = (ids[n] for n in SPECIAL_NAMES)
        self.unk_id = self.sp.unk_id()
        ids = list(range(self.vocab_size))  # one call per question for the whole vocabulary, not one per id
        control, unknown = self.sp.is_control(ids), self.sp.is_unknown(ids)
        self.special_ids = {i for i in ids if control[i] or unknown[i]}
        self._sha256 = None

    @property
    def sha256(self):
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def info(self):
        """What the manifest records to identify this tokenizer."""
        return {"file": self.path.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "unk_id": self.unk_id, "mask_id": self.mask_id, "pad_id": self.pad_id, "cls_id": self.cls_id,
                "sep_id": self.sep_id, "eod_id": self.eod_id, "special_ids": sorted(self.special_ids)}

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def encode_pair(self, a, b=None, max_len=None):
        """<CLS> A <SEP> or <CLS> A <SEP> B <SEP>; over max_len, the longer text loses tokens from its end."""
        a = self.encode(a)
        b = self.encode(b) if b is not None else None
        if max_len is not None:
            budget = max_len - (2 if b is None else 3)
            if budget < 0:
                raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
            if b is None:
                a = a[:budget]
            else:
                na, nb = len(a), len(b)
                while na + nb > budget:
                    if na >= nb:
                        na -= 1
                    else:
                        nb -= 1
                a, b = a[:na], b[:nb]
        ids = [self.cls_id] + a + [self.sep_id]
        return ids + b + [self.sep_id] if b is not None else ids


def train_tokenizer(inputs, vocab_size, out_path, text_field="text", input_sentence_size=2_000_000):
    """Train a sentencepiece unigram model with byte fallback and the llm-jp special-piece layout:
    0 <unk>, 1 <s>, 2 </s>, 3 <MASK>, 4 <PAD>, 5 <CLS>, 6 <SEP>, 7 <EOD>, 8.. the 256 byte pieces.
    Text is not normalised and whitespace is kept, as in llm-jp-tokenizer v3, so decoding gives the text back."""
    files = expand_inputs(inputs)

    failure = []

    def lines():  # sentencepiece trains on lines; documents are split at newlines
        try:
            for path in files:
                for _, text in iter_documents(path, text_field):
                    yield from (line for line in text.split("\n") if line.strip())
        except DataError as e:  # raised inside the trainer it would come back as a RuntimeError
            failure.append(e)

    model = io.BytesIO()
    spm.set_min_log_level(1)  # the trainer's progress log runs to thousands of lines; keep warnings
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model,
            model_type="unigram", vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=[f"<{n}>" for n in SPECIAL_NAMES],
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=os.cpu_count() or 1)
    except RuntimeError as e:  # e.g. "INTERNAL: src/...cc(744) [...] Vocabulary size too high (8000). Please set ..."
        if failure:
            raise failure[0] from None
        reason = str(e).strip().splitlines()[-1].split("] ")[-1]
        raise DataError(f"training a tokenizer on {', '.join(map(str, files))}: {reason}") from None
    if failure:
        raise failure[0]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_path, model.getvalue())
    return Path(out_path)

# ---------------------------------------------------------------------------------------------------------
# reading inputs

def _open_binary(path):
    # a large buffer: the default 8 KiB makes readline() refill many times for each long document
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb", buffering=1 << 20)


def _line_number(path, pos):
    """1-based number of the line starting at (uncompressed) byte offset pos; only needed for error messages."""
    n, done = 1, 0
    with _open_binary(path) as f:
        while done < pos:
            block = f.read(min(1 << 22, pos - done))
            if not block:
                break
            n += block.count(b"\n")
            done += len(block)
    return n


def _read_lines(path, start=0, end=None):
    """Yield (byte offset, line) for the lines of path that start inside [start, end)."""
    with _open_binary(path) as f:
        try:
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    f.readline()  # this line started before start: it belongs to the previous chunk
            pos = f.tell()
            while end is None or pos < end:
                line = f.readline()
                if not line:
                    break
                yield pos, line
                pos += len(line)
        except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged .gz
            raise DataError(f"{path}: cannot read ({e})") from None


def _parse_line(path, pos, line, kind, text_field):
    """The record (text_field None) or text in one raw line; None for a blank line."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_line_number(path, pos)}: not valid UTF-8 (byte {e.start} of the line)") from None
    if pos == 0:
        s = s.removeprefix("\ufeff")
    if kind == "txt":
        s = s.rstrip("\r\n")
        return s if s.strip() else None
    if not s.strip():
        return None
    text = _plain_text(s, text_field) if text_field is not None else None
    if text is None:
        try:
            record = json.loads(s)
        except json.JSONDecodeError as e:
            reason = f"{e.msg.removesuffix(' at')} (column {e.colno})"
            raise DataError(f"{path}:{_line_number(path, pos)}: malformed JSON: {reason}") from None
        except ValueError as e:  # an integer beyond Python's digit limit for int()
            raise DataError(f"{path}:{_line_number(path, pos)}: malformed JSON: {str(e).split(':')[0]}") from None
        except RecursionError:
            raise DataError(f"{path}:{_line_number(path, pos)}: malformed JSON: nested too deeply") from None
        if text_field is None:
            return record
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{_line_number(path, pos)}: record has no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            kind = type(text).__name__
            raise DataError(f"{path}:{_line_number(path, pos)}: field {text_field!r} is {kind}, not a string")
    if "\\u" in s:  # only a JSON escape can make a lone surrogate, which is no text (nor tokenizable)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{path}:{_line_number(path, pos)}: field {text_field!r} holds a lone surrogate "
                            f"\\u{ord(text[e.start]):04x} (character {e.start + 1}), not text") from None
    return text


@functools.lru_cache(maxsize=None)
def _record_head(text_field):
    return "{" + json.dumps(text_field) + ': "'


def _plain_text(s, text_field):
    """record[text_field] for a JSON line s laid out as json.dumps writes {text_field: str, ...}, or None if s
    is not such a line or is malformed (the caller then runs json.loads, which says what is wrong). Only the
    string is decoded, by json's own scanner; fields after it are parsed to check the line and that they do
    not repeat text_field (the last of duplicate keys wins)."""
    head = _record_head(text_field)
    if not s.startswith(head):
        return None
    try:
        text, end = json.decoder.scanstring(s, len(head))
        rest = s[end:].strip(" \t\r\n")  # JSON's whitespace
        if rest == "}":
            return text
        if rest.startswith(","):
            others = json.loads("{" + rest[1:])
            if others and text_field not in others:  # {} would mean a trailing comma
                return text
    except (ValueError, RecursionError):
        pass
    return None


def _input_kind(path):
    name = str(path).removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .txt, optionally .gz)")


def read_jsonl(path, text_field=None):
    """Yield (line number, record) for the JSON lines in path (.gz allowed), skipping blank lines; with
    text_field, yield (line number, record[text_field]) and require it to be a string. Bad lines raise
    DataError naming file:line."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    n = 0
    for pos, line in _read_lines(path):
        n += 1
        item = _parse_line(path, pos, line, "jsonl", text_field)
        if item is not None:
            yield n, item


def iter_documents(path, text_field="text"):
    """Yield (line number, text) for the documents in one input file (.jsonl/.json/.txt, optionally .gz)."""
    kind = _input_kind(path)
    n = 0
    for pos, line in _read_lines(path):
        n += 1
        text = _parse_line(path, pos, line, kind, text_field)
        if text:
            yield n, text


def expand_inputs(inputs):
    """Paths and glob patterns -> list of existing, non-empty input files, in the order given."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for pattern in map(str, inputs):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{pattern}: no files match")
        else:
            matches = [pattern]
        for path in matches:
            if not os.path.exists(path):
                raise DataError(f"{path}: no such file")
            if not os.path.isfile(path):
                raise DataError(f"{path}: not a file")
            _input_kind(path)
            if os.path.getsize(path) == 0:
                raise DataError(f"{path}: empty file")
            files.append(path)
    if not files:
        raise DataError("no input files given")
    return files

# ---------------------------------------------------------------------------------------------------------
# prepare: tokenize into shards in parallel


def _is_val(text, val_fraction):
    return zlib.crc32(text.encode()) < val_fraction * 2.0 ** 32


class _ShardWriter:
    """Streams one split of one task to temporary files; finish() renames them into place."""

    def __init__(self, out_dir, name, dtype, tmp_tag):
        self.out_dir, self.name, self.dtype = Path(out_dir), name, dtype
        self.tmp = self.out_dir / f"{name}.bin.tmp-{tmp_tag}"
        self.f = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.offsets = [0]

    def add(self, docs):
        if not docs:
            return
        lengths = [len(d) for d in docs]
        ids = np.concatenate(docs, dtype=self.dtype, casting="unsafe")  # every id < vocab size fits the dtype
        self.f.write(ids)  # files and hashes take the array's buffer: no copy to bytes
        self.hash.update(ids)
        ends = np.cumsum(lengths) + self.offsets[-1]
        self.offsets.extend(ends.tolist())

    def finish(self):
        self.f.close()
        docs = len(self.offsets) - 1
        if docs == 0:
            self.tmp.unlink()
            return None
        idx = np.asarray(self.offsets, dtype=np.int64).tobytes()
        binary, index = f"{self.name}.bin", f"{self.name}.idx"
        _write_atomic(self.out_dir / index, idx)
        os.replace(self.tmp, self.out_dir / binary)
        itemsize = np.dtype(self.dtype).itemsize
        return {"bin": binary, "idx": index, "docs": docs, "tokens": self.offsets[-1],
                "bin_bytes": self.offsets[-1] * itemsize, "bin_sha256": self.hash.hexdigest(),
                "idx_sha256": hashlib.sha256(idx).hexdigest()}

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _check_shard(out_dir, entry):
    """None if the shard's files are as the record says, else a one-line reason."""
    for key, size in (("bin", entry["bin_bytes"]), ("idx", (entry["docs"] + 1) * 8)):
        path = Path(out_dir) / entry[key]
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return (f"{path}: {path.stat().st_size} bytes where the manifest says {size} "
                    "(truncated or altered after writing)")
        if sha256_file(path) != entry[f"{key}_sha256"]:
            return f"{path}: sha256 differs from the manifest (altered after writing)"
    return None


def _encode_arrays(sp, texts):
    """Token ids of each text as an int32 array, built in C++ by sentencepiece releases that can."""
    try:
        return sp.encode(texts, num_threads=1, return_type="numpy")
    except (TypeError, ValueError):  # older sentencepiece: Python lists only
        return [np.array(ids, dtype=np.int32) for ids in sp.encode(texts, num_threads=1)]


_worker_sp = _worker_stop = None


def _init_worker(tokenizer, stop, parent=None):
    """tokenizer: a loaded SentencePieceProcessor (this process, or handed over by fork) or a path (spawn).
    parent: the pid of the main process; a worker process exits when it is gone (e.g. killed), rather than
    finish its shard and wait for tasks forever."""
    global _worker_sp, _worker_stop
    if not isinstance(tokenizer, spm.SentencePieceProcessor):
        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer))
    _worker_sp = tokenizer
    _worker_stop = stop  # set by the main process when another task failed
    if parent is not None:
        threading.Thread(target=_exit_without, args=(parent,), daemon=True).start()


def _exit_without(parent):
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)  # its temporary files are removed by the next run


def _run_task(task):
    """Tokenize one byte range of one input into a train and a val shard; skip it if already done."""
    out_dir, spec, name = Path(task["out_dir"]), task["spec"], task["name"]
    record_path = out_dir / f"{name}.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if record and record["spec"] == spec and all(
                _check_shard(out_dir, record[s]) is None for s in ("train", "val") if record[s]):
            return {**record, "skipped": True}
    path, kind = spec["input"], _input_kind(spec["input"])
    dtype = np.dtype(task["dtype"])
    writers = {}
    docs = {"train": [], "val": []}
    texts, empty, chars = [], 0, 0

    def flush():
        for text, ids in zip(texts, _encode_arrays(_worker_sp, texts)):
            docs["val" if _is_val(text, spec["val_fraction"]) else "train"].append(ids)
        for s in writers:
            writers[s].add(docs[s])
            docs[s].clear()
        texts.clear()

    try:
        for s in ("train", "val"):
            writers[s] = _ShardWriter(out_dir, f"{s}-{name}", dtype, task["tmp_tag"])
        end = None if path.endswith(".gz") else spec["end"]  # a .gz is one task, read to its (uncompressed) end
        for pos, line in _read_lines(path, spec["start"], end):
            text = _parse_line(path, pos, line, kind, spec["text_field"])
            if not text:
                empty += text is not None  # blank lines are not counted, empty texts are
                continue
            texts.append(text)
            chars += len(text)
            if chars > 1 << 20:  # encode in batches: fewer calls, bounded memory
                flush()
                chars = 0
                if _worker_stop is not None and _worker_stop.is_set():
                    raise DataError("stopped: another shard failed")
        flush()
        record = {"spec": spec, "train": writers["train"].finish(), "val": writers["val"].finish(), "empty": empty}
        _write_atomic(record_path, json.dumps(record, indent=1))
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, OSError):  # reading errors are DataErrors already: this one is writing
            raise DataError(f"{out_dir}: cannot write shards ({e.strerror or e})") from None
        raise
    return {**record, "skipped": False}


def prepare(inputs, tokenizer_path, out_dir, workers=1, text_field="text", val_fraction=0.01, chunk_bytes=None,
            replace=False):
    """Tokenize the inputs into shards in out_dir (see the module docstring) and write out_dir/manifest.json.
    Inputs are cut into byte ranges of chunk_bytes (default: 1/64 of the total, within 1-256 MiB; gzipped
    files are one range each), one shard per range, processed by `workers` processes. Returns the manifest.
    A rerun with the same inputs and settings skips finished shards; out_dir holding another dataset is an
    error unless replace, which then also removes that dataset's shards."""
    files = expand_inputs(inputs)
    tok = Tokenizer(tokenizer_path)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
        lock = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        try:  # on the directory: held by this process and its workers, released by the kernel however they end
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{out_dir}: another prepare is writing there") from None
        return _prepare(files, tok, out_dir, workers, text_field, val_fraction, chunk_bytes, replace)
    finally:
        os.close(lock)


def _prepare(files, tok, out_dir, workers, text_field, val_fraction, chunk_bytes, replace):
    sizes = [os.path.getsize(p) for p in files]
    if not replace:
        _check_tokenizer_matches(out_dir, tok)
        _check_same_dataset(out_dir, tok, files, sizes, text_field, val_fraction)
    for tmp in out_dir.glob("*.tmp-*"):  # left by a run that was killed (only one run writes here at a time)
        tmp.unlink(missing_ok=True)
    if chunk_bytes is None:
        chunk_bytes = min(max(sum(sizes) // 64, 1 << 20), 1 << 28)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    tmp_tag = secrets.token_hex(4)
    tasks = []
    for path, size in zip(files, sizes):
        stat = os.stat(path)
        ranges = [(0, size)] if path.endswith(".gz") else \
            [(a, min(a + chunk_bytes, size)) for a in range(0, size, chunk_bytes)]
        for start, end in ranges:
            spec = {"format": FORMAT_VERSION, "input": os.path.abspath(path), "input_bytes": size,
                    "input_mtime_ns": stat.st_mtime_ns, "start": start, "end": end, "text_field": text_field,
                    "val_fraction": val_fraction, "tokenizer_sha256": tok.sha256}
            digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
            tasks.append({"out_dir": str(out_dir), "spec": spec, "name": f"{len(tasks):05d}-{digest}",
                          "dtype": dtype, "tmp_tag": tmp_tag, "path": path})

    records = {}
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"prepare ({workers} workers)", disable=None)
    try:
        if workers <= 1:
            _init_worker(tok.sp, None)
            for i, task in enumerate(tasks):
                records[i] = _run_task(task)
                bar.update(task["spec"]["end"] - task["spec"]["start"])
        else:  # fork: workers need nothing but the tokenizer, and start at once with the loaded one
            fork = "fork" in mp.get_all_start_methods()
            ctx = mp.get_context("fork" if fork else "spawn")
            stop = ctx.Event()
            init = (tok.sp if fork else str(tok.path), stop, os.getpid())
            with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=init) as pool:
                futures = {pool.submit(_run_task, task): i for i, task in enumerate(tasks)}
                try:
                    for future in as_completed(futures):
                        i = futures[future]
                        records[i] = future.result()
                        bar.update(tasks[i]["spec"]["end"] - tasks[i]["spec"]["start"])
                except BaseException:
                    stop.set()  # running tasks abandon their shards; queued ones are cancelled
                    pool.shutdown(cancel_futures=True)
                    raise
    finally:
        bar.close()
        for tmp in out_dir.glob(f"*.tmp-{tmp_tag}"):  # left by a worker that was killed mid-shard
            tmp.unlink(missing_ok=True)
    records = [records[i] for i in range(len(tasks))]

    for path in files:
        if not any(r[s] for r, t in zip(records, tasks) if t["path"] == path for s in ("train", "val")):
            raise DataError(f"{path}: no documents (only blank lines or empty {text_field!r} fields)")
    splits = {}
    for s in ("train", "val"):
        shards = [r[s] for r in records if r[s]]
        splits[s] = {"docs": sum(e["docs"] for e in shards), "tokens": sum(e["tokens"] for e in shards),
                     "shards": shards}
    manifest = {"format": FORMAT_VERSION, "tokenizer": tok.info(), "dtype": dtype, "text_field": text_field,
                "val_fraction": val_fraction, "inputs": [{"path": p, "bytes": n} for p, n in zip(files, sizes)],
                "empty_texts": sum(r["empty"] for r in records), "splits": splits}
    try:
        _write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write manifest.json ({e.strerror or e})") from None
    if replace:  # the replaced dataset's shards and records
        keep = {e[k] for s in splits.values() for e in s["shards"] for k in ("bin", "idx")}
        keep |= {f"{t['name']}.json" for t in tasks}
        for path in out_dir.iterdir():
            if SHARD_FILE.fullmatch(path.name) and path.name not in keep:
                path.unlink()
    manifest["skipped_shards"] = sum(r["skipped"] for r in records)
    return manifest


SHARD_FILE = re.compile(r"((train|val)-\d{5}-[0-9a-f]{10}\.(bin|idx))|(\d{5}-[0-9a-f]{10}\.json)")


def _check_same_dataset(out_dir, tok, files, sizes, text_field, val_fraction):
    """Refuse to replace the manifest of another dataset: its shards would be left unlisted."""
    try:
        old = json.loads((out_dir / "manifest.json").read_text())
        settings = (old["tokenizer"]["sha256"], old["text_field"], old["val_fraction"])
        inputs = [(os.path.realpath(i["path"]), i["bytes"]) for i in old["inputs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no manifest, or not one of ours
    if (settings, inputs) != ((tok.sha256, text_field, val_fraction),
                              [(os.path.realpath(p), n) for p, n in zip(files, sizes)]):
        first = old["inputs"][0]["path"] if old["inputs"] else "?"
        more = f" and {len(old['inputs']) - 1} more" if len(old["inputs"]) > 1 else ""
        raise DataError(f"{out_dir} holds another dataset (made from {first}{more}, with other inputs or "
                        "settings); use a new output directory, or --replace to replace it")


def _check_tokenizer_matches(out_dir, tok):
    """Refuse to mix tokenizers in one shard directory."""
    for path in [out_dir / "manifest.json", *sorted(out_dir.glob("*.json"))]:
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
            sha = meta["tokenizer"]["sha256"] if "tokenizer" in meta else meta["spec"]["tokenizer_sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            continue  # not one of ours
        if sha != tok.sha256:
            raise DataError(f"{out_dir} holds shards made with another tokenizer (sha256 {sha[:12]}, not "
                            f"{tok.sha256[:12]} of {tok.path}); use a new output directory")


def load_manifest(data_dir, tokenizer=None):
    """Read data_dir/manifest.json; with tokenizer (path or Tokenizer), check that it made the shards."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (make shards with `python data.py prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        want = manifest["tokenizer"]
        if tok.sha256 != want["sha256"]:
            raise DataError(f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) does not match the one {data_dir} "
                            f"was prepared with ({want['file']}, sha256 {want['sha256'][:12]})")
    return manifest

# ---------------------------------------------------------------------------------------------------------
# reading shards


class Shards:
    """The documents of one split, memory-mapped, in stored order: len(shards), shards[i] -> int64 array
    (no <CLS>/<SEP>). verify checks every file's sha256 against the manifest (sizes are always checked)."""

    def __init__(self, data_dir, split="train", verify=True, tokenizer=None):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir, tokenizer)
        self.tokenizer_info = self.manifest["tokenizer"]
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.data_dir}: no split {split!r} (have {', '.join(self.manifest['splits'])})")
        entries = self.manifest["splits"][split]["shards"]
        if not entries:
            raise DataError(f"{self.data_dir}: split {split!r} has no documents")
        self.bins, self.idxs = [], []
        for entry in entries:
            if verify:
                problem = _check_shard(self.data_dir, entry)
            else:
                problem = None
                for key, size in (("bin", entry["bin_bytes"]), ("idx", (entry["docs"] + 1) * 8)):
                    p = self.data_dir / entry[key]
                    if not p.is_file() or p.stat().st_size != size:
                        problem = f"{p}: missing, or not the {size} bytes the manifest says (truncated or altered)"
            if problem:
                raise DataError(problem + "; rerun `python data.py prepare` to rebuild it")
            # a plain ndarray view of the map: slicing a np.memmap costs microseconds per call
            tokens = np.memmap(self.data_dir / entry["bin"], dtype=self.manifest["dtype"], mode="r")
            idx = np.fromfile(self.data_dir / entry["idx"], dtype=np.int64)
            if idx[0] != 0 or idx[-1] != len(tokens) or (np.diff(idx) < 0).any():  # cheap, unlike a hash
                raise DataError(f"{self.data_dir / entry['idx']}: document offsets are damaged; rerun "
                                "`python data.py prepare` to rebuild it")
            self.bins.append(tokens.view(np.ndarray))
            self.idxs.append(idx)
        self.files = [self.data_dir / e["bin"] for e in entries]
        self.first_doc = np.cumsum([0] + [e["docs"] for e in entries])  # global index of each shard's first doc
        self.lengths = np.concatenate([np.diff(idx) for idx in self.idxs])

    def __len__(self):
        return int(self.first_doc[-1])

    def locate(self, i):
        """(bin memmap, start, end) of document i."""
        s = int(np.searchsorted(self.first_doc, i, side="right")) - 1
        j = i - int(self.first_doc[s])
        return self.bins[s], int(self.idxs[s][j]), int(self.idxs[s][j + 1])

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        data, a, b = self.locate(i % len(self))
        return np.asarray(data[a:b], dtype=np.int64)

    def check_ids(self, docs, vocab_size):
        """Raise a DataError naming the shard and document of the first of docs holding an id >= vocab_size."""
        for i in docs:
            ids = self[i]
            if len(ids) and ids.max() >= vocab_size:
                s = int(np.searchsorted(self.first_doc, i, side="right")) - 1
                raise DataError(f"{self.files[s]}: document {i - int(self.first_doc[s])} holds token id {ids.max()}, "
                                f"outside the vocabulary of {vocab_size} (the shard was altered); rerun "
                                "`python data.py prepare` to rebuild it")


def verify_shards(data_dir, record_dir, rank=0, world_size=1):
    """Check this rank's share of every shard file (both splits; shares balanced by bytes) against the
    manifest's sizes and sha256 hashes, once: what was verified is remembered in
    record_dir/shards-verified-*.json (by path, size, modification time and hash), so a restart, on any
    number of ranks, reads only new or changed files. Returns None, or a one-line problem naming the file."""
    data_dir, record_dir = Path(data_dir), Path(record_dir)
    manifest = load_manifest(data_dir)
    files = [(data_dir / e[k], e["bin_bytes"] if k == "bin" else (e["docs"] + 1) * 8, e[f"{k}_sha256"])
             for split in manifest["splits"].values() for e in split["shards"] for k in ("bin", "idx")]
    load = [0] * world_size
    mine = []
    for path, size, sha in sorted(files, key=lambda f: (-f[1], str(f[0]))):  # longest first, to the least loaded
        r = load.index(min(load))
        load[r] += size
        if r == rank:
            mine.append((path, size, sha))
    known = {}
    for record in sorted(record_dir.glob("shards-verified-*.json")):
        try:
            known.update(json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # unreadable: verify again
    own = record_dir / f"shards-verified-{rank}.json"
    done, saved = {}, time.monotonic()
    try:
        for path, size, sha in mine:
            try:
                stat = path.stat()
            except OSError:
                return f"{path}: missing; rerun `python data.py prepare` to rebuild it"
            key, value = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, sha]
            if known.get(key) == value:
                continue
            if stat.st_size != size:
                return (f"{path}: {stat.st_size} bytes where the manifest says {size} (truncated or altered); "
                        "rerun `python data.py prepare` to rebuild it")
            if sha256_file(path) != sha:
                return (f"{path}: sha256 differs from the manifest (altered); rerun `python data.py prepare` "
                        "to rebuild it")
            done[key] = value
            if time.monotonic() - saved > 10:  # progress survives a kill
                record_dir.mkdir(parents=True, exist_ok=True)
                _write_atomic(own, json.dumps({**known, **done}))
                saved = time.monotonic()
    finally:
        if done:
            record_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(own, json.dumps({**known, **done}))
    return None


def verify_in_background(data_dir, record_dir, rank=0, world_size=1):
    """verify_shards in a thread (hashing releases the GIL), e.g. while a checkpoint is loaded: a Future
    whose result() is its answer."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(verify_shards, data_dir, record_dir, rank, world_size)
    pool.shutdown(wait=False)
    return future

# ---------------------------------------------------------------------------------------------------------
# masking


class _Masker:
    """BERT masking from 63 random bits per token (bits 0-31 pick the random token, 32-46 decide whether the
    token is selected, 47-61 which of <MASK> 80% / random 10% / kept 10%); special tokens are never selected
    and never drawn as random replacements."""

    def __init__(self, special_ids, mask_id, vocab_size, p):
        self.mask_id = mask_id
        self.is_special = torch.zeros(vocab_size, dtype=torch.bool)
        self.is_special[sorted(special_ids)] = True
        self.allowed = torch.nonzero(~self.is_special).flatten()
        self.select = round(p * (1 << 15))
        self.to_mask, self.to_random = round(0.8 * (1 << 15)), round(0.9 * (1 << 15))

    def __call__(self, ids, bits):
        if self.is_special.device != ids.device:
            self.is_special, self.allowed = self.is_special.to(ids.device), self.allowed.to(ids.device)
        selected = (((bits >> 32) & 0x7FFF) < self.select) & ~self.is_special.index_select(0, ids)
        kind = (bits >> 47) & 0x7FFF
        random_ids = self.allowed.index_select(0, ((bits & 0xFFFFFFFF) * len(self.allowed)) >> 32)
        out = torch.where(selected & (kind < self.to_mask), self.mask_id, ids)
        out = torch.where(selected & (kind >= self.to_mask) & (kind < self.to_random), random_ids, out)
        labels = torch.where(selected, ids, -100)
        return out, labels


def mask_tokens(ids, special_ids, mask_id, vocab_size, generator=None, p=0.3):
    """MLM masking as in the paper's recipe (Table 1): select each non-special token with probability p; of
    those 80% become <MASK>, 10% a random non-special token, 10% stay. Returns (input_ids, labels) with labels
    -100 where unselected."""
    bits = torch.empty(ids.shape, dtype=torch.int64, device=ids.device).random_(generator=generator)
    return _masker(tuple(sorted(special_ids)), mask_id, vocab_size, p)(ids, bits)


@functools.lru_cache(maxsize=8)
def _masker(special_ids, mask_id, vocab_size, p):  # its tables cost a pass over the vocabulary
    return _Masker(special_ids, mask_id, vocab_size, p)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x):
    """splitmix64's finaliser, in place on a uint64 array: a counter-based generator's output function."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x

# ---------------------------------------------------------------------------------------------------------
# loader


class Loader:
    """MLM batches from a shard directory, the same global batches for any number of ranks.

    A sample is "<CLS> doc <SEP>" truncated to max_seqlen (line_by_line), or a row of max_seqlen tokens cut
    from the concatenation of "<CLS> doc <SEP>" (packed; the last row of an epoch is shorter, and a document
    split across rows continues in the next row without a new <CLS>). Epoch e visits the documents in the
    permutation given by (seed, e). Global batch k is samples [k*batch_size, (k+1)*batch_size) of the
    endless stream of epochs, so a batch may straddle two epochs and nothing is dropped. Rank r takes the
    r-th contiguous slice of every global batch, in micro-batches of micro_batch_size samples; or, with
    micro_batch_tokens, the global batch is packed into micro-batches of at most that many tokens and dealt
    to the ranks by pack_by_tokens (every rank gets the same number; empty ones, {..., "empty": True}, a
    lone <CLS> <SEP> with nothing to predict, fill up, since every rank must join every sharded forward).
    Iterating yields, per optimizer step, the list of this rank's micro-batch dicts {input_ids, labels
    (-100 = not masked), cu_seqlens, max_seqlen}, one sequence per document piece, no padding. The mask of
    a token is a function of (seed, epoch, sample, position) only: independent of world size, micro-batching
    and resume. With shuffle=False the documents are read in stored order, once, and iteration stops (the
    last batch may be short); for evaluation. state_dict() is the position in the sample stream, the same on
    every rank; a run may resume with another world size, micro_batch_size or micro_batch_tokens."""

    def __init__(self, data_dir, split="train", batch_size=32, micro_batch_size=32, max_seqlen=1024, rank=0,
                 world_size=1, seed=0, mode="line_by_line", mlm_probability=0.3, shuffle=True, verify=True,
                 tokenizer=None, micro_batch_tokens=0):
        if mode not in ("line_by_line", "packed"):
            raise ValueError(f"mode must be 'line_by_line' or 'packed', not {mode!r}")
        if micro_batch_tokens and micro_batch_tokens < max_seqlen:
            raise ValueError(f"micro_batch_tokens {micro_batch_tokens} is less than max_seqlen {max_seqlen}")
        if not micro_batch_tokens and batch_size % (world_size * micro_batch_size):
            raise ValueError(f"batch_size {batch_size} is not a multiple of world_size {world_size} x "
                             f"micro_batch_size {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if max_seqlen < 3:
            raise ValueError(f"max_seqlen {max_seqlen} leaves no room for a token between <CLS> and <SEP>")
        self.shards = Shards(data_dir, split, verify=verify, tokenizer=tokenizer)
        self.manifest, self.tokenizer_info = self.shards.manifest, self.shards.tokenizer_info
        info = self.tokenizer_info
        self.cls_id, self.sep_id = info["cls_id"], info["sep_id"]
        self.batch_size, self.micro_batch_size, self.max_seqlen = batch_size, micro_batch_size, max_seqlen
        self.rank, self.world_size, self.seed, self.mode, self.shuffle = rank, world_size, seed, mode, shuffle
        self.micro_batch_tokens = micro_batch_tokens
        self.grad_accum = None if micro_batch_tokens else batch_size // (world_size * micro_batch_size)
        self.vocab_size = info["vocab_size"]
        self.masker = _Masker(info["special_ids"], info["mask_id"], info["vocab_size"], mlm_probability)
        self.doc_tokens = self.shards.lengths + 2  # with <CLS> and <SEP>
        n_docs = len(self.shards)
        n_rows = -(-int(self.doc_tokens.sum()) // max_seqlen)
        self.samples_per_epoch = n_docs if mode == "line_by_line" else n_rows
        self.epoch, self.position = 0, 0  # the next sample is sample `position` of epoch `epoch`
        self._orders = {}

    @property
    def steps_per_epoch(self):
        return self.samples_per_epoch / self.batch_size

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "samples_per_epoch": self.samples_per_epoch, "max_seqlen": self.max_seqlen}

    def load_state_dict(self, state):
        for key in ("seed", "samples_per_epoch", "max_seqlen"):
            if state[key] != getattr(self, key):
                raise DataError(f"cannot resume: the loader state has {key}={state[key]}, "
                                f"this loader {getattr(self, key)}")
        self.epoch, self.position = state["epoch"], state["position"]

    def _order(self, epoch):
        """(document order, start of each document in the epoch's token stream) for one epoch."""
        if epoch not in self._orders:
            n = len(self.shards)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            starts = np.zeros(n + 1, dtype=np.int64)
            if self.mode == "packed":
                np.cumsum(self.doc_tokens[perm], out=starts[1:])
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = (perm, starts)
        return self._orders[epoch]

    def _pieces(self, epoch, i):
        """The sample's pieces as (document, first, end) in "<CLS> doc <SEP>" coordinates (packed mode)."""
        perm, starts = self._order(epoch)
        a, b = i * self.max_seqlen, min((i + 1) * self.max_seqlen, int(starts[-1]))
        k = int(np.searchsorted(starts, a, side="right")) - 1
        pieces = []
        while k < len(perm) and starts[k] < b:
            s = int(starts[k])
            pieces.append((int(perm[k]), max(a - s, 0), min(b, int(starts[k + 1])) - s))
            k += 1
        return pieces

    def _micro_batch(self, samples):
        """samples: list of (epoch, index) -> one micro-batch dict."""
        if self.mode == "line_by_line":  # <CLS> doc[:max_seqlen - 2] <SEP>, as a truncating tokenizer makes it
            doc_ids = [int(self._order(e)[0][i]) for e, i in samples]
            docs = [self.shards.locate(d) for d in doc_ids]
            seqlens = np.array([min(e - s, self.max_seqlen - 2) + 2 for _, s, e in docs], dtype=np.int64)
            sample_lens = seqlens
            ids = np.empty(int(seqlens.sum()), dtype=np.int64)
            o = 0
            for (data, s, _), n in zip(docs, seqlens):
                ids[o] = self.cls_id
                ids[o + 1: o + n - 1] = data[s: s + n - 2]
                ids[o + n - 1] = self.sep_id
                o += n
        else:
            pieces, sample_lens = [], []
            for epoch, i in samples:
                p = self._pieces(epoch, i)
                pieces += p
                sample_lens.append(sum(b - a for _, a, b in p))
            doc_ids = [d for d, _, _ in pieces]
            seqlens = np.array([b - a for _, a, b in pieces], dtype=np.int64)
            ids = np.empty(int(seqlens.sum()), dtype=np.int64)
            o = 0
            for d, a, b in pieces:
                data, s, e = self.shards.locate(d)
                n = e - s  # document tokens; positions 0 and n + 1 are <CLS> and <SEP>
                if a == 0:
                    ids[o] = self.cls_id
                lo, hi = max(a, 1), min(b, n + 1)
                ids[o + lo - a: o + hi - a] = data[s + lo - 1: s + hi - 1]
                if b == n + 2:
                    ids[o + b - a - 1] = self.sep_id
                o += b - a
        if ids.max() >= self.vocab_size:  # only an altered shard; the masker would fail naming nothing
            self.shards.check_ids(doc_ids, self.vocab_size)
        # counter-based randomness: key(seed, epoch, sample) + position, mixed
        ek = np.array([e for e, _ in samples], dtype=np.uint64) * _GOLDEN + np.uint64(self.seed)
        sk = _mix64(_mix64(ek) + np.array([i for _, i in samples], dtype=np.uint64))
        lens = np.array(sample_lens, dtype=np.int64)
        pos = np.arange(len(ids), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        bits = _mix64(np.repeat(sk, lens) + pos.astype(np.uint64) * _GOLDEN) >> np.uint64(1)
        input_ids, labels = self.masker(torch.from_numpy(ids), torch.from_numpy(bits.view(np.int64)))
        cu = np.zeros(len(seqlens) + 1, dtype=np.int32)
        np.cumsum(seqlens, out=cu[1:])
        return {"input_ids": input_ids, "labels": labels, "cu_seqlens": torch.from_numpy(cu),
                "max_seqlen": int(seqlens.max())}

    def sample_tokens(self, first, n):
        """Token counts of the n samples from position first of the endless sample stream."""
        epochs, index = np.divmod(np.arange(first, first + n), self.samples_per_epoch)
        if self.mode == "packed":
            total = int(self.doc_tokens.sum())
            return np.minimum(self.max_seqlen, total - index * self.max_seqlen)
        tokens = np.empty(n, dtype=np.int64)
        for e in np.unique(epochs):
            tokens[epochs == e] = self.doc_tokens[self._order(int(e))[0][index[epochs == e]]]
        return np.minimum(tokens, self.max_seqlen)

    def empty_micro_batch(self):
        return {"input_ids": torch.tensor([self.cls_id, self.sep_id]), "labels": torch.tensor([-100, -100]),
                "cu_seqlens": torch.tensor([0, 2], dtype=torch.int32), "max_seqlen": 2, "empty": True}

    def __iter__(self):
        per_rank = self.batch_size // self.world_size
        while True:
            n = self.batch_size
            if not self.shuffle:
                if self.epoch > 0:
                    return
                n = min(n, self.samples_per_epoch - self.position)
            first = self.epoch * self.samples_per_epoch + self.position  # index in the endless sample stream
            if self.micro_batch_tokens:
                plan = pack_by_tokens(self.sample_tokens(first, n), self.micro_batch_tokens, self.world_size)
                groups = [[first + k for k in ks] for ks in plan[self.rank]]
            else:
                lo, hi = self.rank * per_rank, min((self.rank + 1) * per_rank, n)
                groups = [range(first + a, first + min(a + self.micro_batch_size, hi))
                          for a in range(lo, hi, self.micro_batch_size)]
            micro = [self._micro_batch([divmod(x, self.samples_per_epoch) for x in q]) if len(q) else
                     self.empty_micro_batch() for q in groups]
            self.epoch, self.position = divmod(first + n, self.samples_per_epoch)
            yield micro


def pack_by_tokens(tokens, budget, world_size):
    """Split a global batch, given its samples' token counts, into micro-batches of at most budget tokens,
    the same number for every rank: longest first, each into the first micro-batch with room (first fit
    decreasing), then the micro-batches, largest first, dealt to the ranks in a snake (0..W-1, W-1..0, ...),
    so that micro-step j carries about the same tokens on every rank and the ranks' totals balance. Ranks
    left short get empty micro-batches. Deterministic. Returns [rank][micro-step] -> sample positions."""
    tokens = np.asarray(tokens, dtype=np.int64)
    room = np.empty(len(tokens), dtype=np.int64)  # of each micro-batch opened so far
    members, opened = [], 0
    for k in sorted(range(len(tokens)), key=lambda k: (-tokens[k], k)):
        j = int(np.argmax(room[:opened] >= tokens[k])) if opened else 0
        if not opened or room[j] < tokens[k]:
            j, opened = opened, opened + 1
            room[j] = budget
            members.append([])
        room[j] -= tokens[k]
        members[j].append(k)
    micro = sorted((sorted(m) for m in members), key=lambda m: (-int(tokens[m].sum()), m[0]))
    steps = -(-len(micro) // world_size)
    plan = [[] for _ in range(world_size)]
    for g in range(steps):
        group = micro[g * world_size:(g + 1) * world_size]
        group += [[]] * (world_size - len(group))
        for r, m in enumerate(group if g % 2 == 0 else group[::-1]):
            plan[r].append(m)
    return plan

# ---------------------------------------------------------------------------------------------------------
# command line


def summary(manifest):
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    return (f"shards: train {train['docs']:,} docs / {train['tokens']:,} tokens, val {val['docs']:,} docs / "
            f"{val['tokens']:,} tokens ({manifest['skipped_shards']} finished shards skipped)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo corpus has its own file
        import demo
        return demo.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="= python demo.py: the synthetic demo corpus and eval sets, a tokenizer, shards")
    p = sub.add_parser("tokenizer", help="train a sentencepiece unigram tokenizer with the llm-jp special pieces")
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", required=True, help="the .model file to write")
    p.add_argument("--text_field", default="text")
    p = sub.add_parser("prepare", help="tokenize inputs into shards plus manifest.json")
    p.add_argument("--input", nargs="+", required=True,
                   help="files or glob patterns (.jsonl, .json, .txt, optionally .gz)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="shard directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--text_field", default="text")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--replace", action="store_true",
                   help="replace another dataset already in --out (its shards are removed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "tokenizer":
            train_tokenizer(args.input, args.vocab_size, args.out, args.text_field)
            print(f"trained {args.out} (vocab {args.vocab_size})")
        else:
            print(summary(prepare(args.input, args.tokenizer, args.out, args.workers, args.text_field,
                                  args.val_fraction, replace=args.replace)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
