"""
Data for llm-jp-modernbert: a synthetic Japanese demo corpus, tokenizer training, parallel sharding, and a
memory-mapped MLM loader whose batches depend on the seed alone.

    python data.py demo        # synthetic demo corpus + eval sets, a tokenizer and shards, all in data/demo
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

The demo corpus is synthetic: sentences generated from the templates and entity tables below (mountains,
rivers, prefectures, countries, units of time and measure, English words, ...), the same facts
paraphrased several ways, in documents from a few tokens to several thousand. Its evaluation sets
(Wikipedia-, MIRACL-, JGLUE- and JCoLA-like) are synthetic too; their labels follow from the templates.
"""
import argparse
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import secrets
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    if text_field is not None:
        text = _plain_text(s, text_field)
        if text is not None:
            return text
    try:
        record = json.loads(s)
    except json.JSONDecodeError as e:
        reason = f"{e.msg.removesuffix(' at')} (column {e.colno})"
        raise DataError(f"{path}:{_line_number(path, pos)}: malformed JSON: {reason}") from None
    if text_field is None:
        return record
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{path}:{_line_number(path, pos)}: record has no {text_field!r} field")
    text = record[text_field]
    if not isinstance(text, str):
        kind = type(text).__name__
        raise DataError(f"{path}:{_line_number(path, pos)}: field {text_field!r} is {kind}, not a string")
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
    except ValueError:
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


def _init_worker(tokenizer, stop):
    """tokenizer: a loaded SentencePieceProcessor (this process, or handed over by fork) or a path (spawn)."""
    global _worker_sp, _worker_stop
    if not isinstance(tokenizer, spm.SentencePieceProcessor):
        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer))
    _worker_sp = tokenizer
    _worker_stop = stop  # set by the main process when another task failed


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
    writers = {s: _ShardWriter(out_dir, f"{s}-{name}", dtype, task["tmp_tag"]) for s in ("train", "val")}
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
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    _write_atomic(record_path, json.dumps(record, indent=1))
    return {**record, "skipped": False}


def prepare(inputs, tokenizer_path, out_dir, workers=1, text_field="text", val_fraction=0.01, chunk_bytes=None):
    """Tokenize the inputs into shards in out_dir (see the module docstring) and write out_dir/manifest.json.
    Inputs are cut into byte ranges of chunk_bytes (default: 1/64 of the total, within 1-256 MiB; gzipped
    files are one range each), one shard per range, processed by `workers` processes. Returns the manifest."""
    files = expand_inputs(inputs)
    tok = Tokenizer(tokenizer_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_tokenizer_matches(out_dir, tok)
    sizes = [os.path.getsize(p) for p in files]
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
            init = (tok.sp if fork else str(tok.path), stop)
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
    _write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    manifest["skipped_shards"] = sum(r["skipped"] for r in records)
    return manifest


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
            self.bins.append(tokens.view(np.ndarray))
            self.idxs.append(np.fromfile(self.data_dir / entry["idx"], dtype=np.int64))
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
    """MLM masking (SPEC 3): select each non-special token with probability p; of those 80% become <MASK>,
    10% a random non-special token, 10% stay. Returns (input_ids, labels) with labels -100 where unselected."""
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
    r-th contiguous slice of every global batch, in micro-batches of micro_batch_size samples; iterating
    yields, per optimizer step, the list of this rank's micro-batch dicts {input_ids, labels (-100 = not
    masked), cu_seqlens, max_seqlen}, one sequence per document piece, no padding. The mask of a token is a
    function of (seed, epoch, sample, position) only: independent of world size, micro-batch size and resume.
    With shuffle=False the documents are read in stored order, once, and iteration stops (the last batch
    may be short); for evaluation. state_dict() is the position in the sample stream, the same on every
    rank; a run may resume with another world size or micro-batch size."""

    def __init__(self, data_dir, split="train", batch_size=32, micro_batch_size=32, max_seqlen=1024, rank=0,
                 world_size=1, seed=0, mode="line_by_line", mlm_probability=0.3, shuffle=True, verify=True,
                 tokenizer=None):
        if mode not in ("line_by_line", "packed"):
            raise ValueError(f"mode must be 'line_by_line' or 'packed', not {mode!r}")
        if batch_size % (world_size * micro_batch_size):
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
        self.grad_accum = batch_size // (world_size * micro_batch_size)
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
            docs = [self.shards.locate(int(self._order(e)[0][i])) for e, i in samples]
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

    def __iter__(self):
        per_rank = self.batch_size // self.world_size
        while True:
            n = self.batch_size
            if not self.shuffle:
                if self.epoch > 0:
                    return
                n = min(n, self.samples_per_epoch - self.position)
            first = self.epoch * self.samples_per_epoch + self.position  # index in the endless sample stream
            lo, hi = self.rank * per_rank, min((self.rank + 1) * per_rank, n)
            micro = []
            for a in range(lo, hi, self.micro_batch_size):
                q = range(first + a, first + min(a + self.micro_batch_size, hi))
                micro.append(self._micro_batch([divmod(x, self.samples_per_epoch) for x in q]))
            self.epoch, self.position = divmod(first + n, self.samples_per_epoch)
            yield micro

# ---------------------------------------------------------------------------------------------------------
# synthetic demo corpus and evaluation sets

# entity tables: (name, height m, where)
MOUNTAINS = [
    ("エベレスト", 8849, "ネパールと中国の国境"), ("K2", 8611, "パキスタンと中国の国境"),
    ("キリマンジャロ", 5895, "タンザニア"), ("モンブラン", 4808, "フランスとイタリアの国境"),
    ("富士山", 3776, "静岡県と山梨県"), ("北岳", 3193, "山梨県"), ("奥穂高岳", 3190, "長野県と岐阜県"),
    ("槍ヶ岳", 3180, "長野県"), ("御嶽山", 3067, "長野県と岐阜県"), ("乗鞍岳", 3026, "長野県と岐阜県"),
    ("立山", 3015, "富山県"), ("木曽駒ヶ岳", 2956, "長野県"), ("八ヶ岳", 2899, "長野県と山梨県"),
    ("白山", 2702, "石川県と岐阜県"), ("石鎚山", 1982, "愛媛県"), ("大山", 1729, "鳥取県"),
    ("岩木山", 1625, "青森県"), ("阿蘇山", 1592, "熊本県"), ("桜島", 1117, "鹿児島県"),
    ("六甲山", 931, "兵庫県"), ("筑波山", 877, "茨城県"), ("高尾山", 599, "東京都"),
]
# (name, length km, where, flows into)
RIVERS = [
    ("ナイル川", 6695, "アフリカ", "地中海"), ("アマゾン川", 6516, "南アメリカ", "大西洋"),
    ("長江", 6300, "中国", "東シナ海"), ("ミシシッピ川", 3770, "アメリカ", "メキシコ湾"),
    ("信濃川", 367, "長野県と新潟県", "日本海"), ("利根川", 322, "関東地方", "太平洋"),
    ("石狩川", 268, "北海道", "日本海"), ("天塩川", 256, "北海道", "日本海"), ("北上川", 249, "岩手県と宮城県", "太平洋"),
    ("阿武隈川", 239, "福島県と宮城県", "太平洋"), ("木曽川", 229, "長野県と岐阜県と愛知県", "伊勢湾"),
    ("最上川", 229, "山形県", "日本海"), ("天竜川", 213, "長野県と静岡県", "太平洋"), ("四万十川", 196, "高知県", "太平洋"),
    ("吉野川", 194, "四国", "紀伊水道"), ("筑後川", 143, "九州", "有明海"), ("淀川", 75, "京都府と大阪府", "大阪湾"),
]
# (prefecture, seat of government, region)
PREFECTURES = [
    ("北海道", "札幌市", "北海道"), ("青森県", "青森市", "東北"), ("岩手県", "盛岡市", "東北"), ("宮城県", "仙台市", "東北"),
    ("秋田県", "秋田市", "東北"), ("山形県", "山形市", "東北"), ("福島県", "福島市", "東北"), ("茨城県", "水戸市", "関東"),
    ("栃木県", "宇都宮市", "関東"), ("群馬県", "前橋市", "関東"), ("埼玉県", "さいたま市", "関東"), ("千葉県", "千葉市", "関東"),
    ("東京都", "新宿区", "関東"), ("神奈川県", "横浜市", "関東"), ("新潟県", "新潟市", "中部"), ("富山県", "富山市", "中部"),
    ("石川県", "金沢市", "中部"), ("福井県", "福井市", "中部"), ("山梨県", "甲府市", "中部"), ("長野県", "長野市", "中部"),
    ("岐阜県", "岐阜市", "中部"), ("静岡県", "静岡市", "中部"), ("愛知県", "名古屋市", "中部"), ("三重県", "津市", "近畿"),
    ("滋賀県", "大津市", "近畿"), ("京都府", "京都市", "近畿"), ("大阪府", "大阪市", "近畿"), ("兵庫県", "神戸市", "近畿"),
    ("奈良県", "奈良市", "近畿"), ("和歌山県", "和歌山市", "近畿"), ("鳥取県", "鳥取市", "中国"), ("島根県", "松江市", "中国"),
    ("岡山県", "岡山市", "中国"), ("広島県", "広島市", "中国"), ("山口県", "山口市", "中国"), ("徳島県", "徳島市", "四国"),
    ("香川県", "高松市", "四国"), ("愛媛県", "松山市", "四国"), ("高知県", "高知市", "四国"), ("福岡県", "福岡市", "九州"),
    ("佐賀県", "佐賀市", "九州"), ("長崎県", "長崎市", "九州"), ("熊本県", "熊本市", "九州"), ("大分県", "大分市", "九州"),
    ("宮崎県", "宮崎市", "九州"), ("鹿児島県", "鹿児島市", "九州"), ("沖縄県", "那覇市", "九州"),
]
# (country, capital, region of the world)
COUNTRIES = [
    ("日本", "東京", "アジア"), ("中国", "北京", "アジア"), ("韓国", "ソウル", "アジア"), ("タイ", "バンコク", "アジア"),
    ("ベトナム", "ハノイ", "アジア"), ("インド", "ニューデリー", "アジア"), ("トルコ", "アンカラ", "アジア"),
    ("イギリス", "ロンドン", "ヨーロッパ"), ("フランス", "パリ", "ヨーロッパ"), ("ドイツ", "ベルリン", "ヨーロッパ"),
    ("イタリア", "ローマ", "ヨーロッパ"), ("スペイン", "マドリード", "ヨーロッパ"), ("ロシア", "モスクワ", "ヨーロッパ"),
    ("アメリカ", "ワシントン", "北アメリカ"), ("カナダ", "オタワ", "北アメリカ"), ("メキシコ", "メキシコシティ", "北アメリカ"),
    ("ブラジル", "ブラジリア", "南アメリカ"), ("アルゼンチン", "ブエノスアイレス", "南アメリカ"),
    ("エジプト", "カイロ", "アフリカ"), ("ケニア", "ナイロビ", "アフリカ"), ("オーストラリア", "キャンベラ", "オセアニア"),
]
# (whole, count, counter, "およそ" when approximate)
UNITS = [
    ("1年", 12, "ヶ月", ""), ("1年", 365, "日", "およそ"), ("1年", 52, "週間", "およそ"), ("うるう年の1年", 366, "日", ""),
    ("1週間", 7, "日", ""), ("1日", 24, "時間", ""), ("1時間", 60, "分", ""), ("1分", 60, "秒", ""),
    ("1世紀", 100, "年", ""), ("1キロメートル", 1000, "メートル", ""), ("1メートル", 100, "センチメートル", ""),
    ("1センチメートル", 10, "ミリメートル", ""), ("1キログラム", 1000, "グラム", ""), ("1リットル", 1000, "ミリリットル", ""),
    ("1ダース", 12, "個", ""),
]
ENGLISH = [
    ("ありがとう", "thank you"), ("こんにちは", "hello"), ("さようなら", "goodbye"), ("おはよう", "good morning"),
    ("おやすみ", "good night"), ("ごめんなさい", "sorry"), ("犬", "dog"), ("猫", "cat"), ("鳥", "bird"), ("魚", "fish"),
    ("水", "water"), ("本", "book"), ("山", "mountain"), ("川", "river"), ("海", "sea"), ("空", "sky"), ("月", "moon"),
    ("太陽", "sun"), ("花", "flower"), ("木", "tree"), ("友達", "friend"), ("学校", "school"), ("先生", "teacher"),
    ("赤", "red"), ("青", "blue"), ("りんご", "apple"), ("電車", "train"),
]
PLANETS = ["水星", "金星", "地球", "火星", "木星", "土星", "天王星", "海王星"]
ANIMALS = [("犬", "ワンワン"), ("猫", "ニャー"), ("牛", "モー"), ("羊", "メー"), ("豚", "ブーブー"), ("カエル", "ケロケロ"),
           ("カラス", "カーカー"), ("ニワトリ", "コケコッコー")]
MONTH_NAMES = ["睦月", "如月", "弥生", "卯月", "皐月", "水無月", "文月", "葉月", "長月", "神無月", "霜月", "師走"]
LAKES = ["琵琶湖", "霞ヶ浦", "サロマ湖", "猪苗代湖"]
# (what, answer, alternatives for contradictions, question, templates)
SUPERLATIVES = [
    ("世界で最も高い山", "エベレスト", "mountain", "世界で最も高い山は何ですか。",
     ["{x}は、地球上で最も高い山として知られています。", "世界で最も高い山は{x}です。", "地球上で一番高い山は{x}です。"]),
    ("日本で最も高い山", "富士山", "mountain", "日本で最も高い山は何ですか。",
     ["日本で最も高い山は{x}です。", "{x}は日本一高い山として知られています。", "日本の山の中で一番高いのは{x}です。"]),
    ("世界で最も長い川", "ナイル川", "river", "世界で最も長い川は何ですか。",
     ["最も長い川は{x}です。", "世界で最も長い川は{x}です。", "{x}は、地球上で最も長い川として知られています。"]),
    ("日本で最も長い川", "信濃川", "river", "日本で最も長い川は何ですか。",
     ["日本で最も長い川は{x}です。", "{x}は日本一長い川です。", "日本の川の中で一番長いのは{x}です。"]),
    ("太陽系で最も大きい惑星", "木星", "planet", "太陽系で最も大きい惑星は何ですか。",
     ["太陽系で最も大きい惑星は{x}です。", "{x}は太陽系で一番大きな惑星です。", "太陽系の惑星のうち、最も大きいのは{x}です。"]),
    ("日本で最も大きい湖", "琵琶湖", "lake", "日本で最も大きい湖はどこですか。",
     ["日本で最も大きい湖は{x}です。", "{x}は日本一大きな湖として知られています。", "日本の湖の中で一番大きいのは{x}です。"]),
    ("面積が最も大きい都道府県", "北海道", "prefecture", "面積が最も大きい都道府県はどこですか。",
     ["面積が最も大きい都道府県は{x}です。", "{x}は面積が日本一大きな都道府県です。", "都道府県の中で一番広いのは{x}です。"]),
    ("面積が最も小さい都道府県", "香川県", "prefecture", "面積が最も小さい都道府県はどこですか。",
     ["面積が最も小さい都道府県は{x}です。", "{x}は面積が日本一小さな都道府県です。", "都道府県の中で一番狭いのは{x}です。"]),
]
POOLS = {"mountain": [m[0] for m in MOUNTAINS], "river": [r[0] for r in RIVERS], "planet": PLANETS, "lake": LAKES,
         "prefecture": [p[0] for p in PREFECTURES]}

# (kind, attribute) -> (question, paraphrase templates); slot names as in _demo_facts
TEMPLATES = {
    ("mountain", "height"): ("{s}の標高は何メートルですか。", [
        "{s}の標高は{v}メートルです。", "{s}は標高{v}メートルの山です。", "{s}の高さは{v}メートルである。",
        "{s}は高さが{v}メートルあります。", "標高{v}メートルの山として知られるのが{s}です。"]),
    ("mountain", "place"): ("{s}はどこにある山ですか。", [
        "{s}は{v}にある山です。", "{s}は{v}に位置しています。", "{v}には{s}という山があります。", "{s}がある場所は{v}です。"]),
    ("river", "length"): ("{s}の長さは何キロメートルですか。", [
        "{s}の長さは{v}キロメートルです。", "{s}は全長{v}キロメートルの川です。", "{s}の全長はおよそ{v}キロメートルである。",
        "全長{v}キロメートルの川として知られるのが{s}です。"]),
    ("river", "place"): ("{s}はどこを流れていますか。", [
        "{s}は{v}を流れる川です。", "{v}を流れている川に{s}があります。", "{s}の流域は{v}に広がっています。"]),
    ("river", "mouth"): ("{s}はどこに注いでいますか。", [
        "{s}は{v}に注いでいます。", "{s}の河口は{v}にあります。", "{s}の水は最後に{v}へ流れ込みます。"]),
    ("prefecture", "seat"): ("{s}の{o}所在地はどこですか。", [
        "{s}の{o}所在地は{v}です。", "{v}は{s}の{o}所在地です。", "{s}の{o}は{v}に置かれています。", "{s}の{o}があるのは{v}です。"]),
    ("prefecture", "region"): ("{s}は何地方にありますか。", [
        "{s}は{v}地方にあります。", "{s}は{v}地方に属しています。", "{v}地方には{s}が含まれます。"]),
    ("country", "capital"): ("{s}の首都はどこですか。", [
        "{s}の首都は{v}です。", "{v}は{s}の首都です。", "{s}の首都は{v}という都市です。", "{s}では{v}が首都になっています。"]),
    ("country", "region"): ("{s}はどの地域にある国ですか。", [
        "{s}は{v}にある国です。", "{s}は{v}の国の一つです。", "{v}には{s}という国があります。"]),
    ("unit", "count"): ("{s}は何{u}ですか。", [
        "{s}は{a}{v}{u}です。", "{s}には{a}{v}{u}あります。", "{a}{v}{u}で{s}になります。"]),
    ("english", "word"): ("「{s}」は英語で何と言いますか。", [
        "英語で「{s}」は{v}と言います。", "「{s}」は英語で{v}です。", "「{s}」を英語にすると{v}になります。",
        "英語の{v}は、日本語の「{s}」にあたります。"]),
    ("planet", "order"): ("{s}は太陽から何番目の惑星ですか。", [
        "{s}は太陽から{v}番目の惑星です。", "太陽に{v}番目に近い惑星は{s}です。", "太陽系の惑星を太陽に近い順に並べると、{s}は{v}番目です。"]),
    ("animal", "sound"): ("{s}はどのように鳴きますか。", [
        "{s}は「{v}」と鳴きます。", "{s}の鳴き声は「{v}」です。", "「{v}」と鳴く動物は{s}です。"]),
    ("month", "name"): ("{s}の和風月名は何ですか。", [
        "{s}の和風月名は{v}です。", "{v}は{s}の別名です。", "昔の日本では{s}を{v}と呼びました。"]),
}
FILLERS = {
    "mountain": ["{s}は登山者に人気があります。", "{s}の山頂からは美しい景色が見えます。", "毎年多くの人が{s}を訪れます。",
                 "{s}の周辺には豊かな自然が残っています。", "天気の良い日には遠くから{s}が見えます。"],
    "river": ["{s}の流域では古くから農業が盛んです。", "{s}には多くの橋が架かっています。", "夏になると{s}の河原で遊ぶ人が増えます。",
              "{s}の水は飲み水としても使われています。"],
    "prefecture": ["{s}には多くの観光地があります。", "{s}の郷土料理は旅行者にも人気です。", "{s}には歴史のある町並みが残っています。",
                   "{s}では季節ごとにさまざまな祭りが開かれます。"],
    "country": ["{s}には長い歴史があります。", "{s}から日本を訪れる旅行者もいます。", "{s}の料理は日本でも食べることができます。"],
    "unit": ["このような単位は毎日の生活の中でよく使われます。", "単位の関係を覚えておくと計算が楽になります。"],
    "english": ["英語の授業では、まずこのような言葉を学びます。", "外国の人と話すときに便利な表現です。"],
    "planet": ["太陽系には八つの惑星があります。", "夜空を見上げると、惑星が明るく光って見えることがあります。"],
    "animal": ["動物の鳴き声の表し方は言語によって違います。", "子どもたちは動物の鳴き声をまねして遊びます。"],
    "month": ["和風月名は季節の移り変わりを表しています。", "昔の暦では月の呼び方が今とは違いました。"],
    "superlative": ["このことは学校の授業でも習います。", "多くの人がこのことを知っています。"],
}
CONNECTIVES = ["", "", "", "また、", "さらに、", "なお、", "ちなみに、"]
TOPICS = {"mountain": "山", "river": "川", "prefecture": "都道府県", "country": "国と首都", "unit": "単位",
          "english": "英語の言葉", "planet": "惑星", "animal": "動物の鳴き声", "month": "和風月名", "superlative": "日本と世界の一番"}
FILLMASK_PROMPTS = [  # the paper's prompts first, then ones about the demo facts
    "{}は、地球上で最も高い山として知られています。", "1年は{}ヶ月です。", "1年はおよそ{}日です。",
    "英語で「ありがとう」は{}と言います。", "最も長い川は{}です。",
    "日本で最も高い山は{}です。", "日本で最も長い川は{}です。", "長野県の県庁所在地は{}です。", "{}の首都はパリです。",
    "1週間は{}日です。", "地球は太陽から{}番目の惑星です。", "英語で「犬」は{}と言います。", "猫は「{}」と鳴きます。",
    "3月の和風月名は{}です。", "富士山の標高は{}メートルです。",
]


def _demo_facts():
    """Every fact of the demo world: dicts with kind, subject s, attribute, value v and template slots."""
    facts = []

    def add(kind, attr, s, v, **slots):
        question, templates = TEMPLATES[(kind, attr)]
        facts.append({"kind": kind, "attr": attr, "s": s, "v": v, "slots": {"s": s, "v": v, **slots},
                      "question": question, "templates": templates})

    for name, height, where in MOUNTAINS:
        add("mountain", "height", name, height)
        add("mountain", "place", name, where)
    for name, length, where, mouth in RIVERS:
        add("river", "length", name, length)
        add("river", "place", name, where)
        add("river", "mouth", name, mouth)
    for pref, seat, region in PREFECTURES:
        add("prefecture", "seat", pref, seat, o=pref[-1] + "庁")
        add("prefecture", "region", pref, region)
    for country, capital, region in COUNTRIES:
        add("country", "capital", country, capital)
        add("country", "region", country, region)
    for whole, count, counter, approx in UNITS:
        add("unit", "count", whole, count, u=counter, a=approx)
    for ja, en in ENGLISH:
        add("english", "word", ja, en)
    for i, planet in enumerate(PLANETS):
        add("planet", "order", planet, i + 1)
    for animal, sound in ANIMALS:
        add("animal", "sound", animal, sound)
    for i, name in enumerate(MONTH_NAMES):
        add("month", "name", f"{i + 1}月", name)
    for what, answer, pool, question, templates in SUPERLATIVES:
        facts.append({"kind": "superlative", "attr": what, "s": what, "v": answer, "pool": pool,
                      "slots": {"x": answer}, "question": question, "templates": templates})
    for f in facts:  # a unit fact's "attribute" is its counter, so 1年 = 12ヶ月 and 1年 = 365日 differ
        if f["kind"] == "unit":
            f["attr"] = f["slots"]["u"]
    return facts


def _render(fact, k):
    return fact["templates"][k].format(**fact["slots"])


def _say(rng, fact):
    return _render(fact, rng.randrange(len(fact["templates"])))


def _filler(rng, fact):
    subject = fact["s"] if fact["kind"] in ("mountain", "river", "prefecture", "country") else ""
    return rng.choice(FILLERS[fact["kind"]]).format(s=subject)


def _contradicting(rng, fact, facts):
    """A copy of fact with a value that conflicts with the true one (another number, or another entity's)."""
    v = fact["v"]
    if isinstance(v, int):
        while True:
            w = max(1, v + rng.choice([-1, 1]) * rng.randint(max(1, v // 20), max(2, v // 3)))
            if w != v:
                break
    else:
        if fact["kind"] == "superlative":
            pool = [x for x in POOLS[fact["pool"]] if x != v]
        else:
            pool = [f["v"] for f in facts if (f["kind"], f["attr"]) == (fact["kind"], fact["attr"])]
        # "長野県と岐阜県" does not contradict "長野県": values must share no part
        parts = set(str(v).split("と"))
        pool = sorted({x for x in pool if not parts & set(str(x).split("と"))})
        w = rng.choice(pool)
    slots = dict(fact["slots"])
    slots["x" if fact["kind"] == "superlative" else "v"] = w
    return {**fact, "v": w, "slots": slots}


def _paragraph(rng, fact, by_subject, n_extra):
    """Sentences about fact's subject: the fact, the subject's other facts, fillers, linked facts."""
    sents = [_say(rng, fact)]
    others = [f for f in by_subject[fact["s"]] if f is not fact]
    rng.shuffle(others)
    for f in others[:n_extra]:
        sents.append(rng.choice(CONNECTIVES) + _say(rng, f))
    if rng.random() < 0.5:
        sents.append(_filler(rng, fact))
    if fact["kind"] in ("mountain", "river") and fact["attr"] == "place":  # where it is: facts of that place
        for part in str(fact["v"]).split("と"):
            if part in by_subject and rng.random() < 0.5:
                sents.append(rng.choice(CONNECTIVES) + _say(rng, rng.choice(by_subject[part])))
    return "".join(sents)


def _document(rng, facts, by_kind, by_subject, n_chars):
    """(title, text) of about n_chars characters: one topic, paragraphs separated by newlines."""
    kind = rng.choice(sorted(by_kind))
    fact = rng.choice(by_kind[kind])
    if n_chars < 40:  # a snippet or a question with its answer
        if rng.random() < 0.5:
            return fact["s"], _say(rng, fact)
        return fact["s"], f"問：{fact['question'].format(**fact['slots'])}\n答：{_say(rng, fact)}"
    title = fact["s"] if n_chars < 400 else f"{TOPICS[kind]}について"
    paragraphs, size = [], 0
    while size < n_chars:
        if size and rng.random() < 0.3:  # long documents wander between topics
            kind = rng.choice(sorted(by_kind))
        p = _paragraph(rng, rng.choice(by_kind[kind]) if size else fact, by_subject, rng.randint(0, 3))
        paragraphs.append(p)
        size += len(p)
    return title, "\n".join(paragraphs)


def _jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _corrupt(rng, sentence):
    """An ungrammatical variant: a doubled particle, or the predicate moved to the front."""
    ends = [e for e in ("です。", "ます。", "である。") if sentence.endswith(e)]
    depth = np.cumsum([(c == "「") - (c == "」") for c in sentence])  # never inside a quoted word
    slots = [i for i in range(1, len(sentence) - 1)
             if sentence[i] in "はがをにで" and sentence[i - 1] not in "」はがをにで" and depth[i] == 0]
    if ends and (not slots or rng.random() < 0.4):
        e = ends[0]
        return e[:-1] + sentence[:-len(e)] + "。"
    i = rng.choice(slots)
    extra = rng.choice([p for p in "をが" if p != sentence[i]])
    return sentence[:i + 1] + extra + sentence[i + 1:]


def write_demo(out_dir="data/demo", n_docs=3000, seed=0):
    """Write the synthetic demo corpus and evaluation sets (layouts as the real data sets; see the module
    docstring) to out_dir; deterministic. Returns {name: path}."""
    out = Path(out_dir)
    rng = random.Random(seed)
    facts = _demo_facts()
    by_kind, by_subject = {}, {}
    for f in facts:
        by_kind.setdefault(f["kind"], []).append(f)
        by_subject.setdefault(f["s"], []).append(f)

    # document lengths from a few characters to ~15k (a few thousand tokens), most of them short
    def length(r):
        u = r.random()
        return int(math.exp(r.uniform(math.log(10), math.log(60)))) if u < 0.35 else \
            int(math.exp(r.uniform(math.log(60), math.log(1500)))) if u < 0.95 else \
            int(math.exp(r.uniform(math.log(1500), math.log(12000))))

    corpus = []
    for _ in range(n_docs):
        corpus.append({"text": _document(rng, facts, by_kind, by_subject, length(rng))[1]})
    _jsonl(out / "corpus.jsonl", corpus)

    # held-out Wikipedia-like articles, 40 per length bin of the pseudo-perplexity analysis (~1.4 characters a token)
    wrng = random.Random(seed + 1)
    wiki = []
    for lo, hi in ((30, 1024), (1024, 2048), (2048, 4096), (4096, 8192)):
        for _ in range(40):
            title, text = _document(wrng, facts, by_kind, by_subject, int(1.4 * wrng.uniform(1.05 * lo, 0.92 * hi)))
            wiki.append({"id": f"wiki-{len(wiki):04d}", "title": title, "text": text})
    _jsonl(out / "wiki.jsonl", wiki)

    # MIRACL-like: per fact, two paraphrases as the two positive passages, other facts of its kind as negatives
    mrng = random.Random(seed + 2)
    miracl = []
    for i, f in enumerate(facts):
        a, b = mrng.sample(range(len(f["templates"])), 2)
        positives = [_render(f, a) + (_filler(mrng, f) if mrng.random() < 0.5 else ""), _render(f, b)]
        negatives = mrng.sample([g for g in by_kind[f["kind"]] if g is not f], 2)
        miracl.append({"query_id": str(i), "query": f["question"].format(**f["slots"]),
                       "positive_passages": [{"docid": f"{i}#{k}", "title": f["s"], "text": t}
                                             for k, t in enumerate(positives)],
                       "negative_passages": [{"docid": f"n{i}#{k}", "title": g["s"], "text": _say(mrng, g)}
                                             for k, g in enumerate(negatives)]})
    _jsonl(out / "miracl.jsonl", miracl)

    # JSTS-like similarity, labels by relation: 5 paraphrase, 4 paraphrase plus another sentence, 3 same subject,
    # 2 same attribute of another subject, 1 same kind, 0 unrelated
    srng = random.Random(seed + 3)
    jsts = []
    for n in range(3000):
        f = srng.choice(facts)
        label = n % 6
        same_kind = [g for g in by_kind[f["kind"]] if g["s"] != f["s"]]
        if label == 5 or label == 4:
            a, b = srng.sample(range(len(f["templates"])), 2)
            g_text = _render(f, b) + (_filler(srng, f) if label == 4 else "")
            s1, s2 = _render(f, a), g_text
        else:
            if label == 3:
                pool = [g for g in by_subject[f["s"]] if g is not f]
            elif label == 2:
                pool = [g for g in same_kind if g["attr"] == f["attr"]]
            elif label == 1:
                pool = [g for g in same_kind if g["attr"] != f["attr"]]
            else:
                pool = [g for g in facts if g["kind"] != f["kind"]]
            if not pool:
                continue
            s1, s2 = _say(srng, f), _say(srng, srng.choice(pool))
        jsts.append({"sentence_pair_id": str(len(jsts)), "sentence1": s1, "sentence2": s2, "label": float(label)})

    # JNLI-like: entailment = paraphrase, contradiction = conflicting value, neutral = another fact
    nrng = random.Random(seed + 4)
    jnli = []
    for n in range(3000):
        f = nrng.choice(facts)
        a, b = nrng.sample(range(len(f["templates"])), 2)
        label = ("entailment", "contradiction", "neutral")[n % 3]
        if label == "entailment":
            hyp = _render(f, b)
        elif label == "contradiction":
            hyp = _render(_contradicting(nrng, f, facts), b)
        else:
            pool = [g for g in by_subject[f["s"]] if g is not f] or [g for g in by_kind[f["kind"]] if g["s"] != f["s"]]
            hyp = _say(nrng, nrng.choice(pool))
        jnli.append({"sentence_pair_id": str(len(jnli)), "sentence1": _render(f, a), "sentence2": hyp, "label": label})

    # JCoLA-like acceptability: template sentences (1) and corrupted ones (0)
    crng = random.Random(seed + 5)
    jcola = []
    for n in range(3000):
        s = _say(crng, crng.choice(facts))
        label = n % 2
        jcola.append({"uid": len(jcola), "source": "synthetic", "label": label,
                      "sentence": s if label else _corrupt(crng, s)})

    paths = {"corpus": out / "corpus.jsonl", "wiki": out / "wiki.jsonl", "miracl": out / "miracl.jsonl",
             "jglue": out / "JGLUE" / "datasets", "jcola": out / "JCoLA" / "data" / "jcola-v1.0",
             "fillmask": out / "fillmask.txt"}
    for name, rows in (("jsts", jsts), ("jnli", jnli)):
        cut = len(rows) * 4 // 5
        _jsonl(paths["jglue"] / f"{name}-v1.3" / "train-v1.3.json", rows[:cut])
        _jsonl(paths["jglue"] / f"{name}-v1.3" / "valid-v1.3.json", rows[cut:])
    cut = len(jcola) * 4 // 5
    _jsonl(paths["jcola"] / "in_domain_train-v1.0.json", jcola[:cut])
    _jsonl(paths["jcola"] / "in_domain_valid-v1.0.json", jcola[cut:])
    _write_atomic(paths["fillmask"], "".join(p + "\n" for p in FILLMASK_PROMPTS))
    return paths

# ---------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="write the synthetic demo corpus and eval sets, train a tokenizer, make shards")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--vocab_size", type=int, default=1500, help="the demo text allows at most ~1700")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
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
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            paths = write_demo(args.out)
            print(f"wrote the synthetic demo corpus and eval sets to {args.out}")
            tok = train_tokenizer(paths["corpus"], args.vocab_size, Path(args.out) / "tokenizer.model")
            print(f"trained {tok} (vocab {args.vocab_size})")
            manifest = prepare(paths["corpus"], tok, Path(args.out) / "shards", workers=args.workers, val_fraction=0.05)
        elif args.command == "tokenizer":
            train_tokenizer(args.input, args.vocab_size, args.out, args.text_field)
            print(f"trained {args.out} (vocab {args.vocab_size})")
            return
        else:
            manifest = prepare(args.input, args.tokenizer, args.out, args.workers, args.text_field, args.val_fraction)
        train, val = manifest["splits"]["train"], manifest["splits"]["val"]
        print(f"shards: train {train['docs']:,} docs / {train['tokens']:,} tokens, val {val['docs']:,} docs / "
              f"{val['tokens']:,} tokens ({manifest['skipped_shards']} finished shards skipped)")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
