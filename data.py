"""
Data for llm-jp-modernbert: tokenizer training, parallel sharding, and a memory-mapped MLM loader whose
batches depend on the seed alone (Loader; Mixture draws them from several corpora by weight); and the jsonl
readers (records checked field by field, MIRACL's pairs) that evaluate.py and train.py share.

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
demo.py (`python demo.py`), which uses this file.
"""
import argparse
import atexit
import base64
import ctypes
import errno
import fcntl
import functools
import glob
import gzip
import hashlib
import heapq
import io
import json
import math
import mmap
import multiprocessing as mp
import os
import queue
import re
import resource
import secrets
import struct
import tempfile
import threading
import time
import weakref
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

import ranks
from model import IGNORE_INDEX
from ranks import Problem

FORMAT_VERSION = 1
SPECIAL_NAMES = ("MASK", "PAD", "CLS", "SEP", "EOD")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
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
            raise Problem(f"{path}: tokenizer file not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise Problem(f"{path}: not a sentencepiece model ({str(e).strip().splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = {}
        for name in SPECIAL_NAMES:
            for piece in (f"<{name}>", f"<{name}|LLM-jp>"):
                i = self.sp.piece_to_id(piece)
                if self.sp.id_to_piece(i) == piece:  # piece_to_id answers unk_id for unknown pieces
                    ids[name] = i
                    break
            else:
                raise Problem(f"{path}: tokenizer has no <{name}> piece (needs the llm-jp special-piece layout)")
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
        except Problem as e:  # raised inside the trainer it would come back as a RuntimeError
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
        raise Problem(f"training a tokenizer on {', '.join(map(str, files))}: {reason}") from None
    if failure:
        raise failure[0]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, model.getvalue())
    return Path(out_path)


def _proto_fields(buf):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise. Enough of the
    wire format to read a sentencepiece model without the protobuf package."""
    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i
    i = 0
    while i < len(buf):
        key, i = varint(i)
        kind = key & 7
        if kind == 0:
            value, i = varint(i)
        elif kind in (1, 5):
            size = 8 if kind == 1 else 4
            value, i = buf[i:i + size], i + size
        elif kind == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {kind}")
        yield key >> 3, value


# sentencepiece_model.proto: piece types, and the fields read below with their defaults
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # sentencepiece's visible space


def read_sentencepiece(tok):
    """The parts of a sentencepiece model that define how it tokenizes: [(piece, score, type)], the trainer's
    model type and byte fallback, and the normalizer's settings."""
    pieces, trainer, normalizer = [], {3: 1, 35: 0}, {2: b"", 3: 1, 4: 1, 5: 1}
    for number, value in _proto_fields(tok.sp.serialized_model_proto()):
        if number == 1:
            piece = dict(_proto_fields(value))
            pieces.append((piece[1].decode(), struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0],
                           piece.get(3, NORMAL)))
        elif number in (2, 3):
            (trainer if number == 2 else normalizer).update(_proto_fields(value))
    return {"pieces": pieces, "unigram": trainer[3] == 1, "byte_fallback": bool(trainer[35]),
            "charsmap": normalizer[2], "add_dummy_prefix": bool(normalizer[3]),
            "remove_extra_whitespaces": bool(normalizer[4]), "escape_whitespaces": bool(normalizer[5])}


def hf_tokenizer(tok, max_length):
    """{file name: JSON object} of a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json) that gives
    the ids this sentencepiece model gives, <CLS> A <SEP> and <CLS> A <SEP> B <SEP> around them as the model was
    trained. Written as JSON, without a converter library. As sentencepiece does it: a Unigram model over the
    whole normalized text (no pre-splitting), scored with the pieces' own scores; user-defined pieces always
    taken (sentencepiece scores them length * max score + 1); control and byte pieces not matched in text,
    except that, as in every Hugging Face tokenizer, the special tokens' strings are (a "<MASK>" in a prompt is
    the mask) and the text after one starts a word, as at the start of a text."""
    spec = read_sentencepiece(tok)
    if not spec["unigram"]:
        raise Problem(f"{tok.path}: only unigram sentencepiece models can be exported to a Hugging Face tokenizer")
    pieces = spec["pieces"]
    max_score = max([s for _, s, kind in pieces if kind == NORMAL] + [1.1754944e-38])  # C++ starts at FLT_MIN
    vocab = [[p, len(p) * max_score + 1.0 if kind == USER_DEFINED else s] for p, s, kind in pieces]
    names = {"unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id, "pad": tok.pad_id}
    special = {i: pieces[i][0] for i in sorted({*names.values(), *(i for i, (_, _, kind) in enumerate(pieces)
                                                                   if kind in (CONTROL, UNKNOWN))})}
    normalizers = []
    if spec["charsmap"]:
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(spec["charsmap"]).decode()})
    if spec["remove_extra_whitespaces"]:  # spaces only, as sentencepiece: leading, trailing, runs of them
        normalizers += [{"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec["add_dummy_prefix"]:
        normalizers.append({"type": "Prepend", "prepend": SPACE if spec["escape_whitespaces"] else " "})
    if spec["escape_whitespaces"]:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}] * spec["escape_whitespaces"]
    decoders += [{"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    cls, sep = pieces[tok.cls_id][0], pieces[tok.sep_id][0]

    def piece(name, seq=0):
        return {"SpecialToken": {"id": name, "type_id": seq}} if name in (cls, sep) else \
               {"Sequence": {"id": name, "type_id": seq}}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, p in special.items()],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [piece(cls), piece("A"), piece(sep)],
            "pair": [piece(cls), piece("A"), piece(sep), piece("B", 1), piece(sep, 1)],
            "special_tokens": {p: {"id": p, "ids": [i], "tokens": [p]} for i, p in ((tok.cls_id, cls), (tok.sep_id, sep))}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "Unigram", "unk_id": tok.unk_id, "vocab": vocab, "byte_fallback": spec["byte_fallback"]},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"],  # ModernBERT takes no token_type_ids
        "clean_up_tokenization_spaces": False, "padding_side": "right", "truncation_side": "right",
        **{f"{name}_token": pieces[i][0] for name, i in names.items()},
        "added_tokens_decoder": {str(i): {"content": p, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, p in special.items()},
    }
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config}

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
            raise Problem(f"{path}: cannot read ({e})") from None


def _parse_line(path, pos, line, kind, text_field):
    """The record (text_field None) or text in one raw line; None for a blank line."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Problem(f"{path}:{_line_number(path, pos)}: not valid UTF-8 (byte {e.start} of the line)") from None
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
            raise Problem(f"{path}:{_line_number(path, pos)}: malformed JSON: {reason}") from None
        except ValueError as e:  # an integer beyond Python's digit limit for int()
            raise Problem(f"{path}:{_line_number(path, pos)}: malformed JSON: {str(e).split(':')[0]}") from None
        except RecursionError:
            raise Problem(f"{path}:{_line_number(path, pos)}: malformed JSON: nested too deeply") from None
        if text_field is None:
            return record
        if not isinstance(record, dict) or text_field not in record:
            raise Problem(f"{path}:{_line_number(path, pos)}: record has no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            kind = type(text).__name__
            raise Problem(f"{path}:{_line_number(path, pos)}: field {text_field!r} is {kind}, not a string")
    if "\\u" in s:  # only a JSON escape can make a lone surrogate, which is no text (nor tokenizable)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Problem(f"{path}:{_line_number(path, pos)}: field {text_field!r} holds a lone surrogate "
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
    raise Problem(f"{path}: unsupported file type (expected .jsonl, .json or .txt, optionally .gz)")


def read_jsonl(path, text_field=None):
    """Yield (line number, record) for the JSON lines in path (.gz allowed), skipping blank lines; with
    text_field, yield (line number, record[text_field]) and require it to be a string. Bad lines raise
    Problem naming file:line."""
    if not Path(path).is_file():
        raise Problem(f"{path}: no such file")
    n = 0
    for pos, line in _read_lines(path):
        n += 1
        item = _parse_line(path, pos, line, "jsonl", text_field)
        if item is not None:
            yield n, item


def jsonl_records(path, limit=None):
    """(line number, record) of a jsonl file, at most `limit` records; malformed lines stop with file:line,
    and so does a file without records."""
    if not Path(path).is_file():
        raise Problem(f"{path}: no such file")
    n = 0
    for lineno, record in read_jsonl(path):
        if limit is not None and n >= limit:
            return
        n += 1
        yield lineno, record
    if n == 0:
        raise Problem(f"{path}: no records (an empty file)")


def record_field(record, key, path, lineno, kind=str):
    """record[key], which must be of `kind`; otherwise one line naming file:line."""
    if not isinstance(record, dict) or key not in record:
        raise Problem(f"{path}:{lineno}: record has no field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise Problem(f"{path}:{lineno}: field {key!r} is {type(value).__name__}, expected "
                   + " or ".join(k.__name__ for k in kinds))
    return value


def read_miracl_pairs(path, limit=None):
    """(query, passage) pairs of a MIRACL-layout jsonl, as the paper's Table 4: every item with >= 2 positive
    passages gives query = positive_passages[0].text, passage = positive_passages[1].text. `limit` counts items
    read."""
    pairs = []
    for lineno, item in jsonl_records(path, limit):
        positives = record_field(item, "positive_passages", path, lineno, list)
        if len(positives) >= 2:
            for p in positives[:2]:
                record_field(p, "text", path, lineno)
            pairs.append((positives[0]["text"], positives[1]["text"]))
    if not pairs:
        raise Problem(f"{path}: no item with two or more positive_passages")
    return pairs


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
                raise Problem(f"{pattern}: no files match")
        else:
            matches = [pattern]
        for path in matches:
            if not os.path.exists(path):
                raise Problem(f"{path}: no such file")
            if not os.path.isfile(path):
                raise Problem(f"{path}: not a file")
            _input_kind(path)
            if os.path.getsize(path) == 0:
                raise Problem(f"{path}: empty file")
            files.append(path)
    if not files:
        raise Problem("no input files given")
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
        write_atomic(self.out_dir / index, idx)
        os.replace(self.tmp, self.out_dir / binary)
        itemsize = np.dtype(self.dtype).itemsize
        return {"bin": binary, "idx": index, "docs": docs, "tokens": self.offsets[-1],
                "bin_bytes": self.offsets[-1] * itemsize, "bin_sha256": self.hash.hexdigest(),
                "idx_sha256": hashlib.sha256(idx).hexdigest()}

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _shard_files(data_dir, entry):
    """[(path, size, sha256)] of a shard's .bin and .idx, as its manifest entry records them."""
    return [(Path(data_dir) / entry[key], size, entry[f"{key}_sha256"])
            for key, size in (("bin", entry["bin_bytes"]), ("idx", (entry["docs"] + 1) * 8))]


def _file_problem(path, size, sha256=None, stat=None):
    """None if a shard file has the recorded size (and, given sha256, hash), else a one-line reason."""
    try:
        stat = stat or path.stat()
    except OSError:
        return f"{path}: missing"
    if stat.st_size != size:
        return f"{path}: {stat.st_size} bytes where the manifest says {size} (truncated or altered)"
    if sha256 and sha256_file(path) != sha256:
        return f"{path}: sha256 differs from the manifest (altered)"
    return None


def _check_shard(data_dir, entry, hashes=True):
    """None if the shard's files are as its manifest entry says (sizes, and hashes unless told not to), else a
    one-line reason."""
    return next((problem for path, size, sha256 in _shard_files(data_dir, entry)
                 if (problem := _file_problem(path, size, sha256 if hashes else None))), None)


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
                    raise Problem("stopped: another shard failed")
        flush()
        record = {"spec": spec, "train": writers["train"].finish(), "val": writers["val"].finish(), "empty": empty}
        write_atomic(record_path, json.dumps(record, indent=1))
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, OSError):  # reading errors are Problems already: this one is writing
            raise Problem(f"{out_dir}: cannot write shards ({e.strerror or e})") from None
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
        raise Problem(f"{out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        try:  # on the directory: held by this process and its workers, released by the kernel however they end
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Problem(f"{out_dir}: another prepare is writing there") from None
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
            raise Problem(f"{path}: no documents (only blank lines or empty {text_field!r} fields)")
    splits = {}
    for s in ("train", "val"):
        shards = [r[s] for r in records if r[s]]
        splits[s] = {"docs": sum(e["docs"] for e in shards), "tokens": sum(e["tokens"] for e in shards),
                     "shards": shards}
    manifest = {"format": FORMAT_VERSION, "tokenizer": tok.info(), "dtype": dtype, "text_field": text_field,
                "val_fraction": val_fraction, "inputs": [{"path": p, "bytes": n} for p, n in zip(files, sizes)],
                "empty_texts": sum(r["empty"] for r in records), "splits": splits}
    try:
        write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    except OSError as e:
        raise Problem(f"{out_dir}: cannot write manifest.json ({e.strerror or e})") from None
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
        raise Problem(f"{out_dir} holds another dataset (made from {first}{more}, with other inputs or "
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
            raise Problem(f"{out_dir} holds shards made with another tokenizer (sha256 {sha[:12]}, not "
                          f"{tok.sha256[:12]} of {tok.path}); use a new output directory")


def load_manifest(data_dir, tokenizer=None):
    """Read data_dir/manifest.json; with tokenizer (path or Tokenizer), check that it made the shards."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise Problem(f"{path}: not found (make shards with `python data.py prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Problem(f"{path}: not valid JSON ({e})") from None
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        want = manifest["tokenizer"]
        if tok.sha256 != want["sha256"]:
            raise Problem(f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) does not match the one {data_dir} "
                          f"was prepared with ({want['file']}, sha256 {want['sha256'][:12]})")
    return manifest

# ---------------------------------------------------------------------------------------------------------
# reading shards


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FIXED = 0x10  # the same on Linux, the BSDs and macOS; Python's mmap module does not name it


def _map_files(paths, sizes, dtype):
    """One read-only array over the files, mapped back to back at page boundaries (file i starts at element
    starts[i]): a document is one slice and a batch one gather, whichever shards it draws from. The maps
    are made with the C library rather than Python's mmap, which keeps an open descriptor per map: here
    none is kept, so a corpus of any number of shards holds no open files (the limit is the kernel's
    vm.max_map_count maps per process instead, one per file). Reads are random (madvise): a page fault
    fetches its own page, not the device's read-ahead window around it. Unmapped when the last view of
    the array is gone. Returns (array, starts)."""
    page, itemsize = mmap.PAGESIZE, np.dtype(dtype).itemsize
    offsets = np.cumsum([0] + [-(-size // page) * page for size in sizes])
    total = max(int(offsets[-1]), page)
    failed = ctypes.c_void_p(-1).value
    base = _libc.mmap(None, total, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # reserve the range
    if base == failed:
        raise Problem(f"{Path(paths[0]).parent}: cannot reserve {total:,} bytes of address space for its shards "
                      f"({os.strerror(ctypes.get_errno())})")
    buffer = (ctypes.c_char * total).from_address(base)
    # unmapped with the last view; not at exit, where a thread may still be reading (the process ends anyway)
    weakref.finalize(buffer, _libc.munmap, base, total).atexit = False
    for path, size, offset in zip(paths, sizes, offsets.tolist()):
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != size:  # replaced since it was checked: a map past its end would crash
                raise Problem(f"{path}: changed while it was being opened (now {os.fstat(fd).st_size} bytes, "
                              f"{size} expected); rerun `python data.py prepare` to rebuild it")
            address = _libc.mmap(base + offset, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            err = ctypes.get_errno()
        finally:
            os.close(fd)  # the map keeps the file
        if address == failed:
            why = (f"the {_max_map_count()} maps a process may hold (vm.max_map_count) are in use; raise it with "
                   "sysctl, or merge shards" if err == errno.ENOMEM else os.strerror(err))
            raise Problem(f"{path}: cannot map ({why})")
        _libc.madvise(address, size, mmap.MADV_RANDOM)
    array = np.frombuffer(buffer, dtype=dtype, count=int(offsets[-1]) // itemsize)  # no unmapped page inside
    array.flags.writeable = False
    return array, offsets[:-1] // itemsize


def _max_map_count():
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return "?"


class Shards:
    """The documents of one split, memory-mapped, in stored order: len(shards), shards[i] -> int64 array
    (no <CLS>/<SEP>); spans(docs) -> where a batch of documents lies in self.tokens. verify checks every file's
    sha256 against the manifest (sizes are always checked). Startup reads O(shards): the sizes, and each
    .idx's first and last offset; the offsets between are checked where a document is read, so a damaged one
    is named then. Memory: the maps (page cache, shared by every process of a machine that reads the same
    shards) and a few numbers per shard; nothing per document."""

    def __init__(self, data_dir, split="train", verify=True, tokenizer=None):
        try:
            self._open(data_dir, split, verify, tokenizer)
        except OSError as e:  # e.g. a process at its limit of open files, which the maps themselves do not use
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            why = f"the {limit} open files allowed (ulimit -n) are in use" if e.errno == errno.EMFILE else e.strerror
            raise Problem(f"{e.filename or data_dir}: cannot read ({why})") from None

    def _open(self, data_dir, split, verify, tokenizer):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir, tokenizer)
        self.tokenizer_info = self.manifest["tokenizer"]
        if split not in self.manifest["splits"]:
            raise Problem(f"{self.data_dir}: no split {split!r} (have {', '.join(self.manifest['splits'])})")
        entries = self.manifest["splits"][split]["shards"]
        if not entries:
            raise Problem(f"{self.data_dir}: split {split!r} has no documents")
        for entry in entries:
            if problem := _check_shard(self.data_dir, entry, hashes=verify):
                raise Problem(problem + "; rerun `python data.py prepare` to rebuild it")
        self.files = [self.data_dir / e["bin"] for e in entries]
        self.idx_files = [self.data_dir / e["idx"] for e in entries]
        self.tokens, self.token_start = _map_files(self.files, [e["bin_bytes"] for e in entries],
                                                   self.manifest["dtype"])
        self.offsets, self.offset_start = _map_files(self.idx_files, [(e["docs"] + 1) * 8 for e in entries],
                                                     np.int64)
        self.first_doc = np.cumsum([0] + [e["docs"] for e in entries])  # global index of each shard's first doc
        self.shard_tokens = np.array([e["bin_bytes"] for e in entries]) // self.tokens.itemsize
        first, last = self.offsets[self.offset_start], self.offsets[self.offset_start + np.diff(self.first_doc)]
        for s in np.flatnonzero((first != 0) | (last != self.shard_tokens))[:1]:  # cheap, unlike a hash
            raise Problem(f"{self.idx_files[s]}: document offsets are damaged (they run from {first[s]} to "
                          f"{last[s]}, the .bin holds {self.shard_tokens[s]} tokens); rerun `python data.py "
                          "prepare` to rebuild it")
        self.n_tokens = int(self.shard_tokens.sum())
        if self.n_tokens == 0:
            raise Problem(f"{self.data_dir}: split {split!r} holds no tokens")

    def __len__(self):
        return int(self.first_doc[-1])

    def spans(self, docs):
        """(start, end) in self.tokens of each document in docs (an integer array), checking their offsets."""
        docs = np.asarray(docs, dtype=np.int64)
        s = np.searchsorted(self.first_doc, docs, side="right") - 1
        j = docs - self.first_doc[s]
        a, b = self.offsets[self.offset_start[s] + j], self.offsets[self.offset_start[s] + j + 1]
        for k in np.flatnonzero((a < 0) | (b < a) | (b > self.shard_tokens[s]))[:1]:
            raise Problem(f"{self.idx_files[s[k]]}: the offsets of document {j[k]} are damaged ({a[k]} to "
                          f"{b[k]}, the .bin holds {self.shard_tokens[s[k]]} tokens); rerun `python data.py "
                          "prepare` to rebuild it")
        return self.token_start[s] + a, self.token_start[s] + b

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        (a,), (b,) = self.spans([i % len(self)])
        return self.tokens[a:b].astype(np.int64)

    def check_ids(self, docs, vocab_size):
        """Raise a Problem naming the shard and document of the first of docs holding an id >= vocab_size."""
        for i in docs:
            ids = self[i]
            if len(ids) and ids.max() >= vocab_size:
                s = int(np.searchsorted(self.first_doc, i, side="right")) - 1
                raise Problem(f"{self.files[s]}: document {i - int(self.first_doc[s])} holds token id {ids.max()}, "
                              f"outside the vocabulary of {vocab_size} (the shard was altered); rerun "
                              "`python data.py prepare` to rebuild it")


def verify_shards(data_dir, record_dir, rank=0, world_size=1):
    """Check this rank's share of every shard file (both splits; shares balanced by bytes) against the
    manifest's sizes and sha256 hashes, once: what was verified is remembered in
    record_dir/shards-verified-*.json (by path, size, modification time and hash), so a restart, on any
    number of ranks, reads only new or changed files. Returns None, or a one-line problem naming the file."""
    data_dir, record_dir = Path(data_dir), Path(record_dir)
    manifest = load_manifest(data_dir)
    files = [f for split in manifest["splits"].values() for e in split["shards"] for f in _shard_files(data_dir, e)]
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
            if problem := _file_problem(path, size, sha, stat):
                return problem + "; rerun `python data.py prepare` to rebuild it"
            done[key] = value
            if time.monotonic() - saved > 10:  # progress survives a kill
                record_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(own, json.dumps({**known, **done}))
                saved = time.monotonic()
    finally:
        if done:
            record_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(own, json.dumps({**known, **done}))
    return None


def verify_in_background(data_dirs, record_dir, rank=0, world_size=1):
    """verify_shards of each of data_dirs (one, or a list) in a thread (hashing releases the GIL), e.g. while a
    checkpoint is loaded: a Future whose result() is the first problem found, or None."""
    dirs = data_dirs if isinstance(data_dirs, list) else [data_dirs]
    pool = ThreadPoolExecutor(1)
    future = pool.submit(lambda: next(filter(None, (verify_shards(d, record_dir, rank, world_size) for d in dirs)),
                                      None))
    pool.shutdown(wait=False)
    return future

# ---------------------------------------------------------------------------------------------------------
# masking


MASKED, RANDOM = 0.8, 0.1  # of the selected tokens: shares made <MASK> and a random token; the rest are kept


def masking_scheme(p):
    """What a loader state records of the masks (a resume under another scheme would silently change them)."""
    return {"rate": p, "mask": MASKED, "random": RANDOM, "keep": round(1 - MASKED - RANDOM, 6)}


def _describe_masking(scheme):
    share = lambda x: f"{x * 100:g}%"
    return (f"{share(scheme['rate'])} of the tokens ({share(scheme['mask'])} <MASK>, {share(scheme['random'])} random, "
            f"{share(scheme['keep'])} kept)")


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
        self.to_mask, self.to_random = round(MASKED * (1 << 15)), round((MASKED + RANDOM) * (1 << 15))

    def __call__(self, ids, bits):
        if self.is_special.device != ids.device:
            self.is_special, self.allowed = self.is_special.to(ids.device), self.allowed.to(ids.device)
        selected = (((bits >> 32) & 0x7FFF) < self.select) & ~self.is_special.index_select(0, ids)
        kind = (bits >> 47) & 0x7FFF
        out = torch.where(selected & (kind < self.to_mask), self.mask_id, ids)
        swap = torch.nonzero(selected & (kind >= self.to_mask) & (kind < self.to_random)).flatten()  # ~3%
        out[swap] = self.allowed.index_select(0, ((bits[swap] & 0xFFFFFFFF) * len(self.allowed)) >> 32)
        labels = torch.where(selected, ids, IGNORE_INDEX)
        return out, labels


def mask_tokens(ids, special_ids, mask_id, vocab_size, generator=None, p=0.3):
    """MLM masking as in the paper's recipe (Table 1): select each non-special token with probability p; of
    those 80% become <MASK>, 10% a random non-special token, 10% stay. Returns (input_ids, labels) with labels
    IGNORE_INDEX where unselected."""
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

ORDER_VERSION = 2  # how an epoch orders its documents; a loader state saved under another is refused
_ROUNDS = 8
_PERMUTE = np.uint64(0x5851F42D4C957F2D)  # keeps the order's keys apart from the masks' (same seed)


def _permute(positions, n, seed, epoch):
    """The documents at `positions` (an integer array) of epoch `epoch`'s order: a keyed bijection of [0, n)
    computed on demand, so no order is stored and any position is found in O(1). A Feistel network of
    _ROUNDS rounds (splitmix64 keyed by seed and epoch) permutes [0, a*b), a = ceil(sqrt(n)), b = ceil(n / a):
    a value is (hi, lo) in radices (a, b), and a round maps it to (lo, (hi + F(lo)) mod a), the radices
    swapping. A value that lands at n or above is permuted again until it falls below n (cycle walking, which
    keeps it a bijection of [0, n)); since a*b < n + a, that is rare: about one pass for the whole batch."""
    a = max(2, math.isqrt(n - 1) + 1)
    b = max(2, -(-n // a))
    keys = _mix64(np.array([seed], dtype=np.uint64) ^ _PERMUTE) + np.uint64(epoch)
    keys = _mix64(_mix64(keys) + np.arange(1, _ROUNDS + 1, dtype=np.uint64) * _GOLDEN)
    x = np.asarray(positions, dtype=np.uint64).copy()
    todo = np.arange(len(x))
    while len(todo):
        y = x[todo]
        radix_hi, radix_lo = np.uint64(a), np.uint64(b)
        for key in keys:
            hi, lo = y // radix_lo, y % radix_lo
            y = lo * radix_hi + (hi + _mix64(lo + key) % radix_hi) % radix_hi
            radix_hi, radix_lo = radix_lo, radix_hi
        x[todo] = y
        todo = todo[y >= n]
    return x.astype(np.int64)


def _ranges(lo, hi):
    """The concatenation of arange(lo[j], hi[j]) over j."""
    n = hi - lo
    return np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))


def batch_split_problem(batch_size, micro_batch_size, world_size, micro_batch_tokens=0, max_seqlen=None,
                        name="batch_size"):
    """Why a global batch cannot be split over world_size ranks, or None. Micro-batches of micro_batch_size
    sequences must divide it exactly; micro-batches by tokens (micro_batch_tokens) fit any number of ranks. `name`:
    the setting that gives the batch."""
    if micro_batch_tokens:
        if max_seqlen and micro_batch_tokens < max_seqlen:
            return f"micro_batch_tokens {micro_batch_tokens} is less than max_seqlen {max_seqlen}"
        return None
    if batch_size % (world_size * micro_batch_size) == 0:
        return None
    fits = [m for m in range(1, batch_size // world_size + 1) if batch_size % (world_size * m) == 0]
    split = f"{world_size} processes x " if world_size > 1 else ""
    return (f"{name} {batch_size} is not a multiple of {split}micro_batch_size {micro_batch_size}"
            + (f"; micro_batch_size can be {', '.join(map(str, fits))}" if fits else
               f"; {name} must be a multiple of the {world_size} processes (or set micro_batch_tokens)"))


class Loader:
    """MLM batches from a shard directory, the same global batches for any number of ranks.

    A sample is "<CLS> doc <SEP>" truncated to max_seqlen (line_by_line), or a row of max_seqlen tokens cut
    from the concatenation of "<CLS> doc <SEP>" (packed; the last row of an epoch is shorter, and a document
    split across rows continues in the next row without a new <CLS>). Epoch e visits the documents in the
    order _permute gives for (seed, e). Global batch k is samples [k*batch_size, (k+1)*batch_size) of the
    endless stream of epochs, so a batch may straddle two epochs and nothing is dropped. Rank r takes the
    r-th contiguous slice of every global batch, in micro-batches of micro_batch_size samples; or, with
    micro_batch_tokens, the global batch is packed into micro-batches of at most that many tokens and dealt
    to the ranks by pack_by_tokens (every rank gets the same number; empty ones, {..., "empty": True}, a
    lone <CLS> <SEP> with nothing to predict, fill up, since every rank must join every sharded forward).
    Iterating yields, per optimizer step, the list of this rank's micro-batch dicts {input_ids, labels
    (IGNORE_INDEX = not masked), cu_seqlens, max_seqlen}, one sequence per document piece, no padding. The mask of
    a token is a function of (seed, epoch, sample, position) only: independent of world size, micro-batching
    and resume. With shuffle=False the documents are read in stored order, once, and iteration stops (the
    last batch may be short); for evaluation. prefetch() iterates the same batches, each built on a
    background thread while the previous one is in use.

    Nothing is kept per document: the order is computed where it is needed, and packed rows follow a cursor
    (the document holding the next row's first token, and where it starts in the epoch's stream) that
    every rank advances over the documents of every global batch. state_dict() is the position in the
    sample stream with that cursor, the same on every rank, with the version of the document order and the
    masking scheme (rate and split); a run may resume with another world size, micro_batch_size or
    micro_batch_tokens, not with another order or masking.

    With batch_warmup_tokens, the global batches grow instead: global_batch() gives each one's number of samples
    from the tokens of the batches before it (the state counts them until the warmup ends), so the batches are
    consecutive runs of the same sample stream, the same for any number of ranks, and resume exactly."""

    def __init__(self, data_dir, split="train", batch_size=32, micro_batch_size=32, max_seqlen=1024, rank=0,
                 world_size=1, seed=0, mode="line_by_line", mlm_probability=0.3, shuffle=True, verify=True,
                 tokenizer=None, micro_batch_tokens=0, batch_size_start=0, batch_warmup_tokens=0):
        if mode not in ("line_by_line", "packed"):
            raise ValueError(f"mode must be 'line_by_line' or 'packed', not {mode!r}")
        if problem := batch_split_problem(batch_size, micro_batch_size, world_size, micro_batch_tokens, max_seqlen):
            raise ValueError(problem)
        if batch_warmup_tokens and (problem := batch_split_problem(batch_size_start, micro_batch_size, world_size,
                                                                   micro_batch_tokens, max_seqlen, "batch_size_start")):
            raise ValueError(problem)
        if batch_warmup_tokens and not 0 < batch_size_start <= batch_size:
            raise ValueError(f"batch_size_start {batch_size_start} is not in [1, batch_size {batch_size}]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if max_seqlen < 3:
            raise ValueError(f"max_seqlen {max_seqlen} leaves no room for a token between <CLS> and <SEP>")
        self.shards = Shards(data_dir, split, verify=verify, tokenizer=tokenizer)
        self.tokenizer_info = self.shards.tokenizer_info
        info = self.tokenizer_info
        self.cls_id, self.sep_id = info["cls_id"], info["sep_id"]
        self.batch_size, self.micro_batch_size, self.max_seqlen = batch_size, micro_batch_size, max_seqlen
        self.rank, self.world_size, self.seed, self.mode, self.shuffle = rank, world_size, seed, mode, shuffle
        self.micro_batch_tokens = micro_batch_tokens
        self.batch_size_start, self.batch_warmup_tokens = batch_size_start, batch_warmup_tokens
        self.vocab_size = info["vocab_size"]
        self.masker = _masker(tuple(sorted(info["special_ids"])), info["mask_id"], info["vocab_size"],
                              mlm_probability)  # shared by the loaders of one tokenizer (a mixture's corpora)
        self.masking = masking_scheme(mlm_probability)
        self.n_docs = len(self.shards)
        self.stream_tokens = self.shards.n_tokens + 2 * self.n_docs  # an epoch of "<CLS> doc <SEP>" (packed)
        self.samples_per_epoch = self.n_docs if mode == "line_by_line" else -(-self.stream_tokens // max_seqlen)
        # the next sample is sample `position` of epoch `epoch`; packed: its first token is in the document at
        # position cursor[0] of the epoch's order, whose <CLS> is token cursor[1] of the epoch's stream
        self.epoch, self.position, self.cursor = 0, 0, (0, 0)
        self.seen = 0  # tokens of the global batches so far, counted while the batch size warms up

    def global_batch(self, seen):
        """Samples in the global batch after `seen` tokens: batch_size, or during the warmup batch_size_start grown
        linearly towards batch_size over batch_warmup_tokens tokens, rounded down to a multiple of batch_size_start
        (so that every one splits as batch_size_start does)."""
        if not self.batch_warmup_tokens or seen >= self.batch_warmup_tokens:
            return self.batch_size
        start, warmup = self.batch_size_start, self.batch_warmup_tokens  # exact integer arithmetic
        return min(self.batch_size, start * ((start * warmup + (self.batch_size - start) * seen) // (start * warmup)))

    def state_dict(self):
        state = {"order": ORDER_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                 "samples_per_epoch": self.samples_per_epoch, "max_seqlen": self.max_seqlen,
                 "masking": dict(self.masking), "seen": self.seen}
        if self.mode == "packed":
            state["cursor"] = [self.epoch, self.position, *self.cursor]
        return state

    def load_state_dict(self, state):
        if state.get("order") != ORDER_VERSION:
            raise Problem(f"cannot resume: the loader state was saved with document order "
                          f"{state.get('order', 1)}, this data.py makes order {ORDER_VERSION} (other batches); "
                          "start the run again in a new out_dir")
        if state.get("masking", self.masking) != self.masking:  # a state from before masking was recorded: as now
            raise Problem(f"cannot resume: the loader state was saved masking {_describe_masking(state['masking'])}, "
                          f"this loader masks {_describe_masking(self.masking)} (other masks); start the run again "
                          "in a new out_dir")
        for key in ("seed", "samples_per_epoch", "max_seqlen"):
            if state[key] != getattr(self, key):
                raise Problem(f"cannot resume: the loader state has {key}={state[key]}, "
                              f"this loader {getattr(self, key)}")
        if self.batch_warmup_tokens and "seen" not in state and (state["epoch"], state["position"]) != (0, 0):
            raise Problem("cannot resume: the loader state was saved without a count of the tokens so far, which the "
                          "batch-size warmup needs; start the run again in a new out_dir")
        self.epoch, self.position, self.seen = state["epoch"], state["position"], state.get("seen", 0)
        if self.mode == "packed":
            cursor = state.get("cursor")
            if cursor and cursor[:2] == [self.epoch, self.position]:
                self.cursor = tuple(cursor[2:])
            else:  # a position set by hand: walk the epoch from its start (O(documents))
                self.cursor = self._walk(self.epoch, (0, 0), self.position * self.max_seqlen, keep=False)[1]

    def _docs(self, epochs, positions):
        """The documents at positions of the given epochs' orders (arrays of the same length)."""
        if not self.shuffle:
            return np.asarray(positions, dtype=np.int64)
        docs = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            docs[epochs == e] = _permute(positions[epochs == e], self.n_docs, self.seed, e)
        return docs

    def _walk(self, epoch, cursor, end, keep=True):
        """The documents of epoch `epoch`'s stream from the cursor's to the one holding token end - 1:
        (docs, their <CLS>'s place in the stream, (start, end) in shards.tokens) if keep, and the cursor of
        token `end` (the document at the epoch's end, (n_docs, stream_tokens), when end is the stream's end)."""
        (k, start), parts = cursor, []
        per_doc = self.stream_tokens / self.n_docs
        while k < self.n_docs and start < end:
            count = min(self.n_docs - k, int((end - start) / per_doc * 1.1) + 64, 1 << 20)
            docs = self._docs(np.full(count, epoch), np.arange(k, k + count))
            a, b = self.shards.spans(docs)
            ends = start + np.cumsum(b - a + 2)
            starts = ends - (b - a + 2)
            if keep:
                take = int(np.searchsorted(starts, end, side="left"))
                parts.append((docs[:take], starts[:take], a[:take], b[:take]))
            inside = int(np.searchsorted(ends, end, side="right"))  # the first document ending after `end`
            if inside < count:
                k, start = k + inside, int(starts[inside])
                break
            k, start = k + count, int(ends[-1])
        found = tuple(np.concatenate(p) for p in zip(*parts)) if parts else None
        return found, (k, start)

    def _build(self, state):
        """This rank's micro-batches of the global batch at state = (epoch, position, cursor, seen), and the state
        after it; None past the end (shuffle=False)."""
        epoch, position, cursor, seen = state
        n_samples = batch = self.global_batch(seen)
        if not self.shuffle:
            if epoch > 0:
                return None
            n_samples = min(n_samples, self.samples_per_epoch - position)
        counted = bool(self.micro_batch_tokens or seen < self.batch_warmup_tokens)  # token counts needed
        (sample_epoch, sample_index, walks, docs, spans, tokens), (epoch, position, cursor) = self._take(
            (epoch, position, cursor), n_samples, tokens=counted)
        if seen < self.batch_warmup_tokens:
            seen += int(tokens.sum())
        groups = self._groups(tokens, batch, n_samples)
        need = np.unique(np.concatenate(groups)) if groups else np.empty(0, dtype=np.int64)
        pieces = self._pieces(need, sample_index, docs, spans, walks)
        micro = [self._micro_batch(g, pieces, sample_epoch, sample_index) if len(g) else self.empty_micro_batch()
                 for g in groups]
        return micro, (epoch, position, cursor, seen)

    def _take(self, at, n_samples, tokens=True):
        """The next n_samples samples of the stream from at = (epoch, position, cursor): (their epochs, their indices
        in the epoch, the packed walks, line_by_line: their documents and spans (else None), their token counts
        with <CLS> and <SEP> if `tokens` (else None)), and the (epoch, position, cursor) after them."""
        (epoch, position, cursor), per_epoch, seqlen = at, self.samples_per_epoch, self.max_seqlen
        sample_epoch, sample_index = np.empty(n_samples, dtype=np.int64), np.empty(n_samples, dtype=np.int64)
        walks, filled = [], 0
        while filled < n_samples:  # one epoch at a time
            end = min(position + n_samples - filled, per_epoch)
            here = slice(filled, filled + end - position)
            sample_epoch[here], sample_index[here] = epoch, np.arange(position, end)
            if self.mode == "packed":
                found, cursor = self._walk(epoch, cursor, min(end * seqlen, self.stream_tokens))
                walks.append((filled, filled + end - position, *found))
            filled += end - position
            epoch, position, cursor = (epoch + 1, 0, (0, 0)) if end == per_epoch else (epoch, end, cursor)
        docs = spans = counts = None
        if self.mode == "line_by_line":
            docs = self._docs(sample_epoch, sample_index)
            if tokens:
                spans = self.shards.spans(docs)
                counts = np.minimum(spans[1] - spans[0] + 2, seqlen)
        elif tokens:
            counts = np.minimum(seqlen, self.stream_tokens - sample_index * seqlen)
        return (sample_epoch, sample_index, walks, docs, spans, counts), (epoch, position, cursor)

    def _groups(self, tokens, batch, n_samples):
        """This rank's micro-batches of a global batch of n_samples (batch when full) samples: positions in it."""
        if self.micro_batch_tokens:
            return [np.array(g, dtype=np.int64) for g in pack_by_tokens(tokens, self.micro_batch_tokens,
                                                                        self.world_size)[self.rank]]
        per_rank = batch // self.world_size
        lo, hi = self.rank * per_rank, min((self.rank + 1) * per_rank, n_samples)
        return [np.arange(a, min(a + self.micro_batch_size, hi)) for a in range(lo, hi, self.micro_batch_size)]

    def _pieces(self, need, sample_index, docs, spans, walks):
        """The pieces of the samples `need` (positions in the global batch, ascending), in order: sample, document,
        the document's first token in shards.tokens, its tokens kept, and the piece's range [a, b) of
        "<CLS> doc[:kept] <SEP>"."""
        if self.mode == "line_by_line":
            start, end = (spans[0][need], spans[1][need]) if spans is not None else self.shards.spans(docs[need])
            kept = np.minimum(end - start, self.max_seqlen - 2)
            return need, docs[need], start, kept, np.zeros_like(kept), kept + 2
        return tuple(np.concatenate(p) for p in zip(*(self._row_pieces(need[(need >= q0) & (need < q1)],
                                                                        sample_index, *walk)
                                                      for q0, q1, *walk in walks)))

    def _row_pieces(self, qs, sample_index, docs, starts, a, b):
        """Packed: the pieces of rows qs (positions in the global batch, ascending), from their epoch's walk."""
        L = self.max_seqlen
        row = sample_index[qs] * L
        row_end = np.minimum(row + L, self.stream_tokens)
        first = np.searchsorted(starts, row, side="right") - 1  # the document holding the row's first token
        last = np.searchsorted(starts, row_end, side="left")
        k, count = _ranges(first, last), last - first
        row, row_end, n = np.repeat(row, count), np.repeat(row_end, count), b[k] - a[k]
        return (np.repeat(qs, count), docs[k], a[k], n, np.maximum(row - starts[k], 0),
                np.minimum(row_end, starts[k] + n + 2) - starts[k])

    def _micro_batch(self, group, pieces, sample_epoch, sample_index):
        """One micro-batch dict from the samples `group` (positions in the global batch, ascending)."""
        sample, doc, start, kept, a, b = pieces[:6]
        first, last = np.searchsorted(sample, group, side="left"), np.searchsorted(sample, group, side="right")
        p = _ranges(first, last)
        seqlens = b[p] - a[p]
        offset = np.cumsum(seqlens) - seqlens  # of each piece in the micro-batch
        # token i of piece j is at place a + i of "<CLS> doc[:kept] <SEP>", so doc token a + i - 1: one gather
        source = np.repeat(start[p] + a[p] - 1 - offset, seqlens) + np.arange(int(seqlens.sum()))
        cls, sep = offset[a[p] == 0], (offset + seqlens - 1)[b[p] == kept[p] + 2]
        source[cls], source[sep] = 0, 0  # not read: <CLS> and <SEP> go there
        ids = self._read(source, np.repeat(p, seqlens), pieces)
        ids[cls], ids[sep] = self.cls_id, self.sep_id
        # counter-based randomness: key(seed, epoch, sample) + position, mixed
        sample_lens = np.add.reduceat(seqlens, np.cumsum(last - first) - (last - first))
        ek = sample_epoch[group].astype(np.uint64) * _GOLDEN + np.uint64(self.seed)
        sk = _mix64(_mix64(ek) + sample_index[group].astype(np.uint64))
        pos = np.arange(len(ids), dtype=np.int64) - np.repeat(np.cumsum(sample_lens) - sample_lens, sample_lens)
        bits = _mix64(np.repeat(sk, sample_lens) + pos.astype(np.uint64) * _GOLDEN) >> np.uint64(1)
        input_ids, labels = self.masker(torch.from_numpy(ids), torch.from_numpy(bits.view(np.int64)))
        cu = np.zeros(len(seqlens) + 1, dtype=np.int32)
        np.cumsum(seqlens, out=cu[1:])
        return {"input_ids": input_ids, "labels": labels, "cu_seqlens": torch.from_numpy(cu),
                "max_seqlen": int(seqlens.max())}

    def _read(self, source, piece, pieces):
        """The tokens at `source` in shards.tokens (piece: the piece each is of), checked against the vocabulary."""
        ids = self.shards.tokens[source].astype(np.int64)
        if len(ids) and ids.max() >= self.vocab_size:  # only an altered shard; the masker would fail naming nothing
            self.shards.check_ids(pieces[1][np.unique(piece)].tolist(), self.vocab_size)
        return ids

    def sample_tokens(self, first, n):
        """Token counts of the n samples from position `first` of the endless sample stream (<CLS> and <SEP>
        included, as pack_by_tokens plans them): what a run's micro-batches will hold, without building them."""
        epochs, index = np.divmod(np.arange(first, first + n, dtype=np.int64), self.samples_per_epoch)
        if self.mode == "packed":
            return np.minimum(self.max_seqlen, self.stream_tokens - index * self.max_seqlen)
        start, end = self.shards.spans(self._docs(epochs, index))
        return np.minimum(end - start + 2, self.max_seqlen)

    def empty_micro_batch(self):
        return {"input_ids": torch.tensor([self.cls_id, self.sep_id]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX]),
                "cu_seqlens": torch.tensor([0, 2], dtype=torch.int32), "max_seqlen": 2, "empty": True}

    def _state(self):
        return self.epoch, self.position, self.cursor, self.seen

    def _set_state(self, state):
        self.epoch, self.position, self.cursor, self.seen = state

    def __iter__(self):
        while (built := self._build(self._state())) is not None:
            micro, state = built
            self._set_state(state)
            yield micro

    def prefetch(self, pin_memory=False):
        """An iterator over the same batches as iter(self), each built on a background thread while the one
        before is in use (numpy and torch release the GIL for most of it); with pin_memory (CUDA), in
        pinned memory, ready for copies with non_blocking=True. state_dict() stays the position after the
        batches handed out, not after those built ahead."""
        return _Prefetch(self, pin_memory)


class Mixture(Loader):
    """MLM batches drawn from several shard directories, {data_dir: weight, ...}, so that each corpus's share of the
    tokens follows its weight. Each corpus is read by a Loader of its own (its own keyed order, epochs and packed
    cursor), which gives the samples, in its stream's order; the mixture decides only which corpus each next sample
    of a global batch comes from: the one whose tokens so far divided by its weight are the least, ties to the
    first named. That rule needs no randomness and keeps every corpus's share within one sample of its target, and
    a small corpus with a large weight is read again and again, epoch after epoch (upsampling). Global batches are
    split into ranks and micro-batches as Loader's are, so they are the same for any number of ranks; state_dict()
    holds every corpus's position and tokens so far, so a run resumes exactly. A token's mask is a function of
    (seed, corpus, the corpus's epoch and sample, position). Memory, startup and open files are a Loader's for each
    corpus: the maps and a few numbers per shard, nothing per document."""

    def __init__(self, weights, split="train", batch_size=32, micro_batch_size=32, max_seqlen=1024, rank=0,
                 world_size=1, seed=0, mode="line_by_line", mlm_probability=0.3, verify=True, tokenizer=None,
                 micro_batch_tokens=0, batch_size_start=0, batch_warmup_tokens=0):
        if not weights:
            raise Problem("a mixture names no corpus")
        for data_dir, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise Problem(f"mixture weight of {data_dir}: must be a number above 0, got {weight!r}")
        super().__init__(next(iter(weights)), split, batch_size, micro_batch_size, max_seqlen, rank, world_size,
                         seed, mode, mlm_probability, True, verify, tokenizer, micro_batch_tokens, batch_size_start,
                         batch_warmup_tokens)
        self.names, self.weights = [str(d) for d in weights], np.array([float(w) for w in weights.values()])
        self.corpora = [self] + [Loader(d, split, 1, 1, max_seqlen, seed=seed, mode=mode,
                                        mlm_probability=mlm_probability, verify=verify, tokenizer=tokenizer)
                                 for d in self.names[1:]]
        first = self.tokenizer_info
        for name, corpus in zip(self.names[1:], self.corpora[1:]):
            if corpus.tokenizer_info["sha256"] != first["sha256"]:
                raise Problem(f"mixture: {name} was prepared with tokenizer {corpus.tokenizer_info['file']} (sha256 "
                              f"{corpus.tokenizer_info['sha256'][:12]}), {self.names[0]} with {first['file']} "
                              f"(sha256 {first['sha256'][:12]}); a mixture's corpora share one tokenizer")
        self.drawn = [0] * len(self.corpora)  # tokens drawn from each corpus so far

    def _state(self):
        return tuple((c.epoch, c.position, c.cursor) for c in self.corpora), tuple(self.drawn), self.seen

    def _set_state(self, state):
        at, drawn, self.seen = state
        for corpus, (epoch, position, cursor) in zip(self.corpora, at):
            corpus.epoch, corpus.position, corpus.cursor = epoch, position, cursor
        self.drawn = list(drawn)

    def _draw(self, at, drawn, n):
        """Which corpus each of the next n samples comes from, given each corpus's position and tokens so far; the
        tokens so far after them, and their token counts."""
        first = [e * c.samples_per_epoch + p for c, (e, p, _) in zip(self.corpora, at)]
        ahead = [np.empty(0, dtype=np.int64)] * len(at)  # the next samples' token counts, read as the draw needs them
        taken, drawn, choice, counts = [0] * len(at), list(drawn), np.empty(n, dtype=np.int64), np.empty(n, np.int64)
        heap = [(d / w, c) for c, (d, w) in enumerate(zip(drawn, self.weights.tolist()))]
        heapq.heapify(heap)
        for i in range(n):
            _, c = heapq.heappop(heap)
            if taken[c] == len(ahead[c]):  # a corpus's share of the samples, then twice as many
                more = max(16, len(ahead[c]), int(n * self.weights[c] / self.weights.sum()))
                ahead[c] = np.concatenate([ahead[c], Loader.sample_tokens(self.corpora[c], first[c] + taken[c], more)])
            choice[i], counts[i] = c, ahead[c][taken[c]]
            drawn[c] += int(counts[i])
            taken[c] += 1
            heapq.heappush(heap, (drawn[c] / self.weights[c], c))
        return choice, drawn, counts

    def sample_tokens(self, first, n):
        """Token counts of the n samples from position `first` of the mixture's stream (drawn from its start)."""
        start = tuple((0, 0, (0, 0)) for _ in self.corpora)
        return self._draw(start, [0] * len(self.corpora), first + n)[2][first:]

    def _build(self, state):
        at, drawn, seen = state
        n = batch = self.global_batch(seen)
        choice, drawn, _ = self._draw(at, drawn, n)
        sample_epoch, sample_index = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        tokens, taken, after = np.empty(n, dtype=np.int64), [], []
        for c, corpus in enumerate(self.corpora):
            where = np.flatnonzero(choice == c)
            took, next_at = Loader._take(corpus, at[c], len(where))
            taken.append((where, took))
            after.append(next_at)
            # the masks' key: (epoch, sample) of the corpus, its epochs kept apart from the other corpora's
            sample_epoch[where], sample_index[where], tokens[where] = took[0] * len(self.corpora) + c, took[1], took[5]
        if seen < self.batch_warmup_tokens:
            seen += int(tokens.sum())
        groups = self._groups(tokens, batch, n)
        need = np.unique(np.concatenate(groups)) if groups else np.empty(0, dtype=np.int64)
        parts = []
        for c, (corpus, (where, (_, index, walks, docs, spans, _))) in enumerate(zip(self.corpora, taken)):
            local = np.flatnonzero(np.isin(where, need))  # ascending, as where is
            if len(local):  # else this rank's share holds no sample of this corpus (or the batch none at all)
                sample, *rest = Loader._pieces(corpus, local, index, docs, spans, walks)
                parts.append((where[sample], np.full(len(sample), c), *rest))
        if parts:  # else every micro-batch of this rank is empty (by tokens, a rank short of data)
            pieces = tuple(np.concatenate(p) for p in zip(*parts))
            order = np.argsort(pieces[0], kind="stable")  # a sample's pieces stay in order
            pieces = tuple(p[order] for p in pieces)
            pieces = (pieces[0], *pieces[2:], pieces[1])  # Loader's pieces, then each one's corpus
        micro = [self._micro_batch(g, pieces, sample_epoch, sample_index) if len(g) else self.empty_micro_batch()
                 for g in groups]
        return micro, (tuple(after), tuple(drawn), seen)

    def _read(self, source, piece, pieces):
        corpus = pieces[6][piece]
        ids = np.empty(len(source), dtype=np.int64)
        for c in np.unique(corpus).tolist():
            mine = corpus == c
            ids[mine] = Loader._read(self.corpora[c], source[mine], piece[mine], pieces)
        return ids

    def progress(self):
        """{data_dir: {"tokens": drawn so far, "epochs": epochs read so far}} of every corpus."""
        return {name: {"tokens": d, "epochs": c.epoch + c.position / c.samples_per_epoch}
                for name, c, d in zip(self.names, self.corpora, self.drawn)}

    def state_dict(self):
        return {"mixture": [{"data_dir": name, "weight": float(w), "drawn": d, **Loader.state_dict(c)}
                            for name, w, c, d in zip(self.names, self.weights.tolist(), self.corpora, self.drawn)],
                "seen": self.seen}

    def load_state_dict(self, state):
        saved = state.get("mixture")
        if saved is None:
            raise Problem("cannot resume: the loader state is of one corpus, this run reads a mixture; start the run "
                          "again in a new out_dir")
        if [(s["data_dir"], s["weight"]) for s in saved] != list(zip(self.names, self.weights.tolist())):
            raise Problem("cannot resume: the loader state is of the mixture " + ", ".join(
                f"{s['data_dir']}: {s['weight']:g}" for s in saved) + "; this run reads " + ", ".join(
                f"{n}: {w:g}" for n, w in zip(self.names, self.weights.tolist())))
        for corpus, s in zip(self.corpora, saved):
            Loader.load_state_dict(corpus, {**s, "seen": 0})
        self.drawn, self.seen = [s["drawn"] for s in saved], state["seen"]


class _Prefetch:
    """Loader.prefetch's iterator: a thread builds batches from the loader's state at the start, one ahead of
    those handed out; a Problem there is raised here, on the next batch."""

    running = set()  # (thread, cancel event) of every builder thread alive, stopped at exit

    def __init__(self, loader, pin_memory):
        self.loader, self.queue, self.cancel = loader, queue.Queue(maxsize=1), threading.Event()
        state = loader._state()
        thread = threading.Thread(target=self._run, args=(loader, state, pin_memory, self.queue, self.cancel),
                                  daemon=True)
        _Prefetch.running.add((thread, self.cancel))
        thread.start()

    @staticmethod
    def _run(loader, state, pin_memory, out, cancel):  # holds no reference to the iterator, so that it can be dropped
        def put(item):  # False once stopped
            while not cancel.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            while True:
                built = loader._build(state)  # None past the end
                if built is not None and pin_memory:
                    built = ([{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in mb.items()}
                              for mb in built[0]], built[1])
                if not put(built) or built is None:
                    return
                state = built[1]
        except BaseException as e:
            put(e)
        finally:
            _Prefetch.running.discard((threading.current_thread(), cancel))

    def __iter__(self):
        return self

    def __next__(self):
        built = self.queue.get()
        if isinstance(built, BaseException):
            self.queue.put(built)  # and again on every later call
            raise built
        if built is None:
            self.queue.put(None)
            raise StopIteration
        micro, state = built
        self.loader._set_state(state)
        return micro

    def close(self):
        self.cancel.set()

    __del__ = close


@atexit.register
def _stop_prefetching():
    """A daemon thread still inside numpy or torch when the interpreter shuts down can crash the process."""
    for thread, cancel in list(_Prefetch.running):
        cancel.set()
        thread.join()


def pack_by_tokens(tokens, budget, world_size):
    """Split a global batch, given its samples' token counts, into micro-batches of at most budget tokens,
    the same number for every rank: longest first, each into the first micro-batch with room (first fit
    decreasing), then the micro-batches, largest first, dealt to the ranks in a snake (0..W-1, W-1..0, ...),
    so that micro-step j carries about the same tokens on every rank and the ranks' totals balance. Ranks
    left short get empty micro-batches. Deterministic. Returns [rank][micro-step] -> sample positions.

    First fit puts a sample into micro-batch 0 iff it fits there at its turn, which depends on micro-batch 0's
    earlier samples only: so micro-batch 0 holds what one pass over the samples, taking each that fits, takes;
    micro-batch 1 what such a pass over the rest takes; and so on. Longest first, the samples that fit a room
    are a suffix of those left, taken in runs: a pass is a few binary searches, not a loop over samples."""
    order = np.lexsort((np.arange(len(tokens)), -np.asarray(tokens)))  # longest first, ties in sample order
    left = np.asarray(tokens, dtype=np.int64)[order]
    members = []
    while len(order):
        ends, negated = np.cumsum(left), -left  # negated: ascending, for binary searches
        taken = np.zeros(len(order), dtype=bool)
        taken[0], room, p = True, budget - int(left[0]), 1  # the longest opens it, even if over budget
        while True:
            p = max(p, int(np.searchsorted(negated, -room, side="left")))  # the first that fits
            if p == len(order):
                break
            q = int(np.searchsorted(ends, ends[p - 1] + room, side="right"))  # then all that fit after it
            taken[p:q] = True
            room -= int(ends[q - 1] - ends[p - 1])
            p = q
        members.append((-int(left[taken].sum()), sorted(order[taken].tolist())))
        order, left = order[~taken], left[~taken]
    micro = [m for _, m in sorted(((total, m[0]), m) for total, m in members)]
    steps = -(-len(micro) // world_size)
    micro += [[]] * (steps * world_size - len(micro))
    plan = [[] for _ in range(world_size)]
    for g in range(steps):
        group = micro[g * world_size:(g + 1) * world_size]
        for r, m in enumerate(group if g % 2 == 0 else group[::-1]):
            plan[r].append(m)
    return plan


EMPTY_WARNING = 0.25  # share of empty micro-batches above which micro_batch_report warns
PLANNED = 8           # global batches whose micro-batches it plans to estimate that share


def empty_share(loader, budget, world_size, batch_size, batches=PLANNED):
    """(empty micro-batches, all micro-batches) when the loader's first `batches` global batches are packed into
    micro-batches of at most `budget` tokens and dealt to world_size ranks by pack_by_tokens: every rank runs as many
    micro-steps, so a rank short of data computes a lone <CLS> <SEP> while the others learn."""
    empty = total = 0
    for k in range(batches):
        plan = pack_by_tokens(loader.sample_tokens(k * batch_size, batch_size), budget, world_size)
        empty += sum(1 for steps in plan for m in steps if len(m) == 0)
        total += sum(len(steps) for steps in plan)
    return empty, total


def micro_batch_report(loader, batch_size, micro_batch_tokens, max_seqlen, world_size):
    """One line for the start of a run: the share of empty micro-batches of <= micro_batch_tokens on world_size
    processes, and above EMPTY_WARNING the settings that would fill them (smaller micro-batches, larger global batches,
    or fewer processes)."""
    empty, total = empty_share(loader, micro_batch_tokens, world_size, batch_size)
    line = (f"{empty / total:.0%} of the micro-batches of <= {micro_batch_tokens} tokens empty on {world_size} "
            f"processes (the first {PLANNED} global batches)")
    if empty / total <= EMPTY_WARNING:
        return line
    filled = (total - empty) / PLANNED  # micro-batches with data per global batch
    steps = total / PLANNED / world_size  # micro-steps each process runs
    budgets = range(micro_batch_tokens - max_seqlen, max_seqlen - 1, -max_seqlen)  # largest first
    smaller = next(((b, e / t) for b in budgets for e, t in [empty_share(loader, b, world_size, batch_size)]
                    if e / t <= EMPTY_WARNING), None)
    ways = ([f"lower micro_batch_tokens to {smaller[0]} ({smaller[1]:.0%} empty)"] if smaller else []) + [
        f"raise batch_size to about {math.ceil(batch_size * steps * world_size / filled)}"] + (
        [f"run on about {int(filled)} processes"] if filled < world_size else [])
    if smaller is None:
        e, t = empty_share(loader, max_seqlen, world_size, batch_size)
    return (f"warning: {line}: a global batch of {batch_size} sequences fills about {filled:.0f} micro-batches "
            f"and each process runs {steps:.0f}; to fill them, {', '.join(ways[:-1])} or {ways[-1]}"
            + ("" if smaller else f" (even micro_batch_tokens={max_seqlen} leaves {e / t:.0%} empty)"))

# ---------------------------------------------------------------------------------------------------------
# command line


def summary(manifest):
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    return (f"shards: train {train['docs']:,} docs / {train['tokens']:,} tokens, val {val['docs']:,} docs / "
            f"{val['tokens']:,} tokens ({manifest['skipped_shards']} finished shards skipped)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
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
    except Problem as e:
        ranks.exit_with(str(e))


if __name__ == "__main__":
    main()
