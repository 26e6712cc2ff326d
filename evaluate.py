"""
Evaluate encoders: every analysis of the llm-jp-modernbert paper (Sections 4-5: Tables 2-4, Figures 1-5) in one
script, on the data sets' published layouts.

    python evaluate.py --task ppl                  # pseudo-perplexity vs length of the latest demo run
    python evaluate.py --task all --plot           # every task on the demo sets, with the paper's figures
    python evaluate.py --task retrieval --model out/stage2/hf path/to/bert-base-japanese-v3 --data miracl-ja-train.jsonl
    python evaluate.py --task jglue --full --model path/to/llm-jp-modernbert-base --data path/to/JGLUE \\
        --jcola_data path/to/JCoLA
    torchrun --nproc_per_node=8 evaluate.py --task all --full     # the work shared over 8 GPUs (see spread)

Tasks: mlm, ppl, fillmask, retrieval, jglue, alignment, simdist, lengths, curves, all (see TASKS at the end).
--model takes Hugging Face model directories, our checkpoints (RUN/ckpt_STEP) or run directories (their final
hf/ export, else their newest checkpoint), several side by side in one table and one figure. ModernBERT weights
run on model.py; other masked-LM encoders (BERT, RoBERTa, DeBERTa-v2, ...) and tokenizers other than
sentencepiece run through transformers (optional: pip install transformers). Default: out/demo/hf. Special ids
(mask, pad, cls, sep) come from each model's tokenizer. A task that cannot apply to a model (ppl bins longer than
its positions, mlm on shards another tokenizer made, curves of a model that is no training run) says so in one
line and "n/a" in the table; the other models run and are written.
--data takes the task's data set in its published layout; without it, the demo sets in data/demo/.
Settings: the paper's on a GPU (or with --full), smaller ones that finish in minutes on a CPU (or with --quick).
Each task writes OUT/TASK.json (every number and the settings that produced them) and prints a table; --task
all also writes OUT/summary.json and one combined table, and OUT/report.md: the paper's published numbers
(Tables 2-4) beside this run's, with what makes them not comparable (--report for other tasks);
--plot draws OUT/TASK.png (needs matplotlib).

Retrieval baselines (the paper's Table 4 does not define them; ours): "edit distance" scores a passage by
1 - Levenshtein distance / length of the longer text, "Jaccard" by |A & B| / |A | B| of the two texts' sets;
at the character level (units = characters) and the word level (units = maximal runs of one script: kanji,
hiragana, katakana, Latin letters or digits; any other non-space character is a unit of its own).
"""
import argparse
import bisect
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import ranks
from data import Shards, Tokenizer, jsonl_records, load_manifest, mask_tokens, read_miracl_pairs, record_field
from model import (IGNORE_INDEX, ModernBERT, ModernBertForSequenceClassification, by_budget, cpu_threads, embed, pack,
                   recall_mrr)
from ranks import Problem

DEMO = Path("data/demo")
TIMEOUT = 600  # seconds, under torchrun: --timeout
DEFAULT_MODEL = "out/demo/hf"
# The paper's settings (Section 4): on a GPU by default, anywhere with --full.
PAPER = dict(docs_per_bin=500, positions=100, pairs=2000, lrs=[5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 1e-4],
             epochs=[1, 2, 3, 4, 5, 10], grid="paper", limit=None)
# Settings that finish in minutes on a CPU: the default there, anywhere with --quick. JGLUE: one run per
# learning rate, scored after each listed epoch of its schedule ("per_lr" below).
SMALL = dict(docs_per_bin=3, positions=10, pairs=50, lrs=[1e-3], epochs=[3, 5], grid="per_lr", limit=1000)
# Table 3's prompts, exactly as printed; "{}" marks the masked token
PAPER_PROMPTS = ["{}は、地球上で最も高い山として知られ、世界中の登山家たちの憧れの地となっています。",
                 "{}は、歴史上の重要な出来事であり、多くの人々の生活や社会のあり方に大きな影響を与えました。",
                 "最も長い川は{}です。その流域には多くの都市や村が広がり、豊かな自然や文化が育まれています。",
                 "1年は{}ヶ月です。", "英語で「ありがとう」は{}と言います。", "1年はおよそ{}日です。"]


class Progress:
    """A progress bar on a terminal; elsewhere (a log file, a pipe) a plain line every 30 seconds and at the end.
    Under torchrun each update also tells the watchdog that this rank's work moves."""
    watchdog = None

    def __init__(self, desc, total=None, every=30.0):
        self.desc, self.total, self.n, self.every = desc, total, 0, every
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(desc=desc, total=total, leave=False, dynamic_ncols=True)

    def update(self, n=1):
        self.n += n
        if self.watchdog:
            self.watchdog.at(self.n, self.desc)
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self.line()

    def line(self):
        of = f"/{self.total}" if self.total else ""
        print(f"  {self.desc}: {self.n}{of} ({time.perf_counter() - self.start:.0f} s)", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif time.perf_counter() - self.start >= self.every:
            self.line()


def progress(iterable, desc, total=None):
    bar = Progress(desc, total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None))
    for x in iterable:
        yield x
        bar.update()
    bar.close()


# -----------------------------------------------------------------------------------------------------------
# the work of a torchrun job: every rank runs every task on the same inputs, and the costly part of each (the
# fine-tuning runs, the documents scored, the texts embedded) is shared: each rank does its share, and every rank
# gathers the whole, so that the rest of a task runs alike everywhere; rank 0 alone prints and writes


def dealt(costs, world):
    """Items dealt to `world` ranks longest first, each to the rank with the least work so far (the lowest of
    equals). -> [indices, ascending] per rank; the same on every rank."""
    load, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(world), key=load.__getitem__)
        shares[r].append(i)
        load[r] += costs[i]
    return [sorted(s) for s in shares]


GATHERS = itertools.count()  # names of the points where the ranks meet, one per gather


def gathered(part):
    """Every rank's part, on every rank, in rank order. The ranks first meet through the watchdog, which waits as
    long as every rank is heard from (shares end at different times, maybe hours apart), then exchange the parts
    in one collective."""
    if Progress.watchdog:
        Progress.watchdog.barrier(f"gather {next(GATHERS)}")
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def spread(fn, items, costs):
    """fn(a list of items) -> a result per item (a list, or a tensor of a row each), run on this rank's share of
    `items` (dealt by `costs`) and gathered on every rank in the order of `items`. One process: fn(items)."""
    if not dist.is_initialized():
        return fn(items)
    share = dealt(costs, dist.get_world_size())[dist.get_rank()]
    parts = gathered((share, fn([items[i] for i in share])))
    done = parts[0][1]
    if isinstance(done, torch.Tensor):
        out = torch.empty(len(items), *done.shape[1:], dtype=done.dtype)
        for where, rows in parts:
            out[where] = rows
        return out
    out = [None] * len(items)
    for where, results in parts:
        for i, r in zip(where, results):
            out[i] = r
    return out


def embedded(model, tok, texts, max_len, token_budget=16384):
    """model.py's embed of the texts, shared over the ranks by their characters."""
    return spread(lambda share: embed(model, tok, share, max_len, token_budget, embedding_progress), texts,
                  [len(t) for t in texts])


# -----------------------------------------------------------------------------------------------------------
# models and tokenizers


def find_weights(path):
    """--model PATH -> ("hf", dir) for a Hugging Face directory (config.json) or ("ckpt", dir) for one of our
    training checkpoints (meta.json). A run directory stands for its final export hf/, else its newest ckpt_STEP."""
    try:
        return checkpoint.resolve(path)
    except Problem as e:
        raise Problem(f"--model {e}" + (" (run `python train.py configs/demo.py` first to make the demo model)"
                                     if str(path) == str(DEFAULT_MODEL) else ""))


def model_type(where):
    """config.json's model_type, or a one-line error naming the file."""
    file = Path(where) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Problem(f"{file}: not valid JSON ({e})")
    if not isinstance(config, dict):
        raise Problem(f"{file}: not a JSON object")
    return config.get("model_type")


def load_model(path, device):
    """-> (model in eval mode, the tokenizer file that belongs to it or None). ModernBERT weights (Hugging Face
    directories and our checkpoints) load into model.py; any other Hugging Face encoder through transformers."""
    kind, where = find_weights(path)  # the path's errors worded for --model
    if kind == "hf" and model_type(where) != "modernbert":
        return load_transformers_model(where, device), None
    try:
        model, tokenizer = checkpoint.load_model(path)
    except Problem as e:
        raise Problem(f"--model {path}: {e}")
    return model.to(device).eval(), (tokenizer if tokenizer.is_file() else None)


def import_transformers(why):
    try:
        import transformers
    except ImportError:
        raise Problem(f"{why} needs transformers (pip install transformers)")
    transformers.logging.set_verbosity_error()  # "some weights were newly initialised": the classifier, as intended
    transformers.logging.disable_progress_bar()  # a bar per model loaded; ours say what runs
    return transformers


class TransformersMLM(torch.nn.Module):
    """A transformers masked LM (BERT, RoBERTa, ...) behind the interface the tasks use of model.ModernBERT:
    packed input (total_tokens,) + cu_seqlens, padded here for transformers and unpadded again."""

    def __init__(self, hf, where):
        super().__init__()
        self.hf, self.where, self.config = hf, Path(where), hf.config
        # positions the model can embed (RoBERTa's position ids start after the padding index)
        offset = self.config.pad_token_id + 1 if self.config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        self.max_positions = self.config.max_position_embeddings - offset
        self.filler = self.config.pad_token_id or 0  # fills the padding, which attention never sees

    def padded(self, input_ids, cu_seqlens, max_seqlen):
        """-> (input_ids (B, S), attention_mask (B, S), where each packed token lies in the flat (B*S,) batch)."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)
        at = seq * max_seqlen + torch.arange(len(input_ids), device=input_ids.device) - cu_seqlens[:-1].long()[seq]
        ids = torch.full((len(lengths) * max_seqlen,), self.filler, device=input_ids.device)
        mask = torch.zeros(len(lengths) * max_seqlen, dtype=torch.long, device=input_ids.device)
        ids[at], mask[at] = input_ids, 1
        return ids.view(-1, max_seqlen), mask.view(-1, max_seqlen), at

    def forward(self, input_ids, labels=None, cu_seqlens=None, max_seqlen=None):
        """As ModernBERT.forward on packed input: with labels, (logits of the labelled tokens, mean CE)."""
        ids, mask, at = self.padded(input_ids, *packing_of(input_ids, cu_seqlens, max_seqlen))
        logits = self.hf(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[at]  # (total_tokens, V)
        if labels is None:
            return logits, None
        selected = labels != IGNORE_INDEX
        return logits[selected], F.cross_entropy(logits[selected].float(), labels[selected])

    def encode(self, input_ids, cu_seqlens=None, max_seqlen=None):
        """Mean-pooled last hidden states over each sequence's tokens (B, H)."""
        cu, m = packing_of(input_ids, cu_seqlens, max_seqlen)
        ids, mask, _ = self.padded(input_ids, cu, m)
        h = self.hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, H)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class TransformersClassifier(torch.nn.Module):
    """transformers' AutoModelForSequenceClassification (the model's own pooling and head, a fresh classifier),
    with the loss of model.ModernBertForSequenceClassification: MSE for one label, cross-entropy otherwise."""

    def __init__(self, mlm, num_labels):
        super().__init__()
        transformers = import_transformers(f"--model {mlm.where}")
        self.mlm = mlm
        try:
            self.hf = transformers.AutoModelForSequenceClassification.from_pretrained(mlm.where, num_labels=num_labels)
        except (ValueError, OSError, KeyError) as e:
            why = str(e).splitlines()[0]
            raise NotApplicable(f"transformers builds no sequence classifier for it ({why})") from None
        self.hf.to(device_of(mlm))

    def forward(self, input_ids, labels=None, cu_seqlens=None, max_seqlen=None):
        ids, mask, _ = self.mlm.padded(input_ids, *packing_of(input_ids, cu_seqlens, max_seqlen))
        logits = self.hf(input_ids=ids, attention_mask=mask).logits
        if labels is None:
            return logits, None
        if logits.shape[-1] == 1:
            return logits, F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return logits, F.cross_entropy(logits.float(), labels)


def load_transformers_model(where, device):
    """A Hugging Face encoder directory of any architecture with a masked-LM head, through transformers."""
    transformers = import_transformers(f"--model {where} ({model_type(where)})")
    try:
        hf = transformers.AutoModelForMaskedLM.from_pretrained(where)
    except (ValueError, OSError, KeyError) as e:
        raise Problem(f"--model {where}: transformers cannot load it ({str(e).splitlines()[0]})")
    return TransformersMLM(hf, where).to(device).eval()


def packing_of(input_ids, cu_seqlens, max_seqlen):
    if cu_seqlens is None:  # one sequence
        return torch.tensor([0, len(input_ids)], dtype=torch.int32, device=input_ids.device), len(input_ids)
    return cu_seqlens, int(max_seqlen if max_seqlen is not None else (cu_seqlens[1:] - cu_seqlens[:-1]).max())


class TransformersTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json, vocab.txt, ...) behind data.Tokenizer's interface."""
    FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
             "spm.model", "sentencepiece.bpe.model", "special_tokens_map.json")

    def __init__(self, path):
        transformers = import_transformers(f"the tokenizer in {path}")
        self.path = Path(path)
        try:
            self.hf = transformers.AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError, KeyError) as e:
            raise Problem(f"{path}: transformers cannot load its tokenizer ({str(e).splitlines()[0]})")
        self.hf.model_max_length = 10 ** 9  # documents are measured whole; callers truncate
        t = self.hf
        self.cls_id = t.cls_token_id if t.cls_token_id is not None else t.bos_token_id
        self.sep_id = t.sep_token_id if t.sep_token_id is not None else t.eos_token_id
        self.mask_id, self.pad_id = t.mask_token_id, t.pad_token_id
        if None in (self.cls_id, self.sep_id, self.mask_id):
            raise Problem(f"{path}: the tokenizer lacks a cls/bos, sep/eos or mask token, which an encoder needs")
        self.special_ids = set(t.all_special_ids)
        self.vocab_size = len(t)
        h = hashlib.sha256()
        for name in self.FILES:
            if (self.path / name).is_file():
                h.update(name.encode() + (self.path / name).read_bytes())
        self.sha256 = h.hexdigest()

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.hf.decode([int(i) for i in ids])

    def encode_pair(self, a, b=None, max_len=None):
        return self.hf(a, b, truncation=max_len is not None, max_length=max_len)["input_ids"]

    def prompt_ids(self, prompt):
        return self.hf(prompt.replace("{}", self.hf.mask_token))["input_ids"]

    def pieces(self, ids):
        return self.hf.convert_ids_to_tokens([int(i) for i in ids])


def has_transformers_tokenizer(where):
    return any((Path(where) / f).is_file() for f in TransformersTokenizer.FILES)


SPECIAL_IDS = ("mask", "pad", "cls", "sep")


def stated_special_ids(kind, where, model):
    """{name: id} of the special ids a ModernBERT's own files state, to catch a wrong tokenizer: every one for
    our checkpoints; for a Hugging Face directory only those its config.json names (transformers' ModernBERT
    config has no mask id, and ModernBertConfig's defaults are not that model's)."""
    if not isinstance(model, ModernBERT):
        return {}
    if kind == "ckpt":
        return {name: getattr(model.config, f"{name}_token_id") for name in SPECIAL_IDS}
    config = json.loads((Path(where) / "config.json").read_text())
    return {name: config[f"{name}_token_id"] for name in SPECIAL_IDS if config.get(f"{name}_token_id") is not None}


def load_tokenizer(path, model, model_path, stated=None):
    """The tokenizer file or directory, checked against the model's vocabulary and the special ids its files
    state. Every task takes its special ids (mask, pad, cls, sep) from the tokenizer."""
    p = Path(path)
    if p.is_dir():
        tok = TransformersTokenizer(p)
    elif p.is_file():
        tok = Tokenizer(str(p))
    else:
        raise Problem(f"tokenizer {path}: no such file (give --tokenizer X.model)")
    if tok.vocab_size > model.config.vocab_size:
        raise Problem(f"tokenizer {path} has {tok.vocab_size} pieces but model {model_path} only "
                      f"{model.config.vocab_size} embeddings")
    for name, theirs in (stated or {}).items():
        if getattr(tok, f"{name}_id") != theirs:
            raise Problem(f"tokenizer {path} has {name} id {getattr(tok, f'{name}_id')} but model {model_path} expects "
                          f"{theirs}: wrong tokenizer?")
    return tok


class EvaluatedModel:
    """One model under evaluation: its name (the --model argument), the model and its tokenizer."""

    def __init__(self, name, model, tokenizer, tokenizer_path):
        self.name, self.model, self.tok, self.tok_path = name, model, tokenizer, str(tokenizer_path)
        self.max_positions = getattr(model, "max_positions", model.config.max_position_embeddings)

    def max_len(self, args, default=None):
        """--max_len, else `default` (as the paper: 512 for fine-tuning), else the model's maximum length."""
        return min(args.max_len or default or self.max_positions, self.max_positions)


class NotApplicable(Exception):
    """Raised deep inside a task for a model it cannot apply to; the task catches it for that model alone."""


def not_applicable(task, name, why):
    """A task that cannot apply to one model: one line now, the reason in its results, "n/a" in the table; the
    other models still run."""
    print(f"{task}: {name}: {why}; not run for this model", flush=True)
    return {"not_applicable": why}


def table_cells(results, entries, fmt):
    """One table cell per model: fmt(its results), or "n/a" for a model the task could not apply to."""
    return ["n/a" if "not_applicable" in results[e.name] else fmt(results[e.name]) for e in entries]


def load_entries(args):
    paths = args.model or [DEFAULT_MODEL]
    toks = args.tokenizer or [None]
    if len(toks) not in (1, len(paths)):
        raise Problem(f"--tokenizer: give one tokenizer for all models or one per model ({len(paths)}), "
                      f"not {len(toks)}")
    entries = []
    for i, path in enumerate(paths):
        model, own = load_model(path, args.device)
        kind, where = find_weights(path)
        # the tokenizer: --tokenizer, else the model's own sentencepiece file, else its transformers tokenizer
        # files, else (a demo model) the demo tokenizer
        tok_path = toks[i if len(toks) > 1 else 0] or own
        if tok_path is None and kind == "hf" and has_transformers_tokenizer(where):
            tok_path = where
        tok_path = tok_path or DEMO / "tokenizer.model"
        tok = load_tokenizer(tok_path, model, path, stated_special_ids(kind, where, model))
        entries.append(EvaluatedModel(path, model, tok, tok_path))
    return entries


def device_of(model):
    return next(model.parameters()).device


# -----------------------------------------------------------------------------------------------------------
# data sets in their published layouts


def read_texts(path, limit=None):
    """[(id, text)] of a Wikipedia-style jsonl ({"text", optional "id"})."""
    texts = [(lineno, r, record_field(r, "text", path, lineno)) for lineno, r in jsonl_records(path, limit)]
    return [(str(r.get("id", f"line {lineno}")), text) for lineno, r, text in texts]


def sample_by_length(tok, path, edges, per_bin, seed, limit=None):
    """Documents sampled uniformly at random within each length bin (reservoir sampling over the file).
    A document is "<CLS> text <SEP>", never truncated; its length counts the special tokens. Bins are
    (edges[i], edges[i+1]], the first including 0; documents longer than the last edge are not used, nor are
    documents with nothing to mask (every token special or unknown), which are counted. Under torchrun the
    records are tokenized shared over the ranks (one in every world size each) and every rank draws the sample
    alike from what they all found; the chosen ones are read again for their ids.
    -> (list of bins, each a list of (id, ids int64 tensor); {"per_bin": counts, "ids": the first 10} of those
    with nothing to mask)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    found = []  # (record number, bin, nothing to mask) of this rank's records that fall in a bin
    for n, (lineno, r) in enumerate(progress(jsonl_records(path, limit), f"tokenizing {Path(path).name}")):
        text = record_field(r, "text", path, lineno)  # every rank checks every record: a bad one stops all alike
        if n % world == rank:
            ids = tok.encode(text)
            b = bisect.bisect_left(edges, len(ids) + 2) - 1
            if 0 <= b < len(edges) - 1:
                found.append((n, b, all(t in tok.special_ids for t in ids)))
    if world > 1:
        found = sorted(x for part in gathered(found) for x in part)
    rng = random.Random(seed)
    chosen, seen = [[] for _ in edges[:-1]], [0] * (len(edges) - 1)
    unmaskable, first_unmaskable = {"per_bin": [0] * (len(edges) - 1), "ids": []}, []
    for n, b, empty in found:
        if empty:
            unmaskable["per_bin"][b] += 1
            if len(first_unmaskable) < 10:
                first_unmaskable.append(n)
            continue
        seen[b] += 1
        if len(chosen[b]) < per_bin:
            chosen[b].append(n)
        elif (j := rng.randrange(seen[b])) < per_bin:
            chosen[b][j] = n
    wanted, docs = {n for c in chosen for n in c} | set(first_unmaskable), {}
    for n, (lineno, r) in enumerate(jsonl_records(path, limit) if wanted else ()):
        if n in wanted:
            ids = [tok.cls_id] + tok.encode(r["text"]) + [tok.sep_id]
            docs[n] = (str(r.get("id", f"line {lineno}")), torch.tensor(ids))
        if n == max(wanted):
            break
    unmaskable["ids"] = [docs[n][0] for n in first_unmaskable]
    return [[docs[n] for n in c] for c in chosen], unmaskable


def parse_edges(text):
    try:
        edges = [int(x) for x in text.split(",")]
    except ValueError:
        edges = []
    if len(edges) < 2 or edges != sorted(set(edges)) or edges[0] < 0:
        raise Problem(f"--bins {text}: expected increasing token counts separated by commas, "
                      f"e.g. 0,1024,2048,4096,8192")
    return edges


# -----------------------------------------------------------------------------------------------------------
# metrics (each checked against an independent computation in tests/test_evaluate.py)


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def average_ranks(x):
    """1-based ranks, ties given the mean of the ranks they span."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


def mcc(pred, gold):
    """Matthews correlation coefficient of binary predictions."""
    pred, gold = np.asarray(pred).astype(bool), np.asarray(gold).astype(bool)
    tp, tn = float((pred & gold).sum()), float((~pred & ~gold).sum())
    fp, fn = float((pred & ~gold).sum()), float((~pred & gold).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def alignment(x, y):
    """E ||f(x) - f(x+)||^2 over positive pairs; rows of x, y are normalised embeddings."""
    return (x - y).pow(2).sum(-1).mean().item()


def uniformity(z, t=2.0):
    """log E exp(-t ||f(x) - f(y)||^2) over every pair of distinct rows of z (normalised embeddings): all pairs
    among the sampled random texts, the lower-variance estimate of the expectation over random pairs."""
    d2 = torch.cdist(z.double(), z.double()).pow(2)
    off = ~torch.eye(len(z), dtype=torch.bool)
    return torch.logsumexp(-t * d2[off], 0).item() - math.log(off.sum().item())


def edit_distances(query, corpus):
    """Levenshtein distance (characters) from `query` to every string of `corpus` at once: Myers' bit-parallel
    algorithm in blocks of 64 query characters (Myers 1999, "advance_block"), run on all corpus strings in
    parallel with numpy. The DP column for a text character is updated 64 rows per word operation."""
    m, n_corpus = len(query), len(corpus)
    lengths = np.array([len(s) for s in corpus], dtype=np.int64)
    if m == 0 or n_corpus == 0:
        return lengths
    order = np.argsort(-lengths, kind="stable")  # longest first: the strings still running are a prefix
    chars = sorted(set(query))
    index = {c: i for i, c in enumerate(chars)}
    codes = np.array([ord(c) for c in chars])
    n_words = (m + 63) // 64
    peq = np.zeros((len(chars) + 1, n_words), np.uint64)  # last row: characters not in the query
    for i, c in enumerate(query):
        peq[index[c], i // 64] |= np.uint64(1 << (i % 64))
    text = np.zeros((n_corpus, int(lengths.max())), np.int64)
    for row, s in enumerate(order):
        text[row, :lengths[s]] = [ord(c) for c in corpus[s]]
    at = np.minimum(np.searchsorted(codes, text), len(codes) - 1)
    sym = np.where(codes[at] == text, at, len(chars))  # (n_corpus, max_len) rows of peq
    high = [np.uint64(1 << 63)] * (n_words - 1) + [np.uint64(1 << ((m - 1) % 64))]
    one = np.uint64(1)
    pv = np.full((n_words, n_corpus), np.uint64(2**64 - 1))
    mv = np.zeros((n_words, n_corpus), np.uint64)
    score = np.full(n_corpus, m, np.int64)
    sorted_len = lengths[order]
    for j in range(text.shape[1]):
        live = int(np.searchsorted(-sorted_len, -j, side="left"))  # strings longer than j
        hin = np.ones(live, np.int64)  # the DP's top row grows by one per text character
        for w in range(n_words):
            eq, p, mm = peq[sym[:live, j], w], pv[w, :live], mv[w, :live]
            xv = eq | mm
            eq = eq | (hin < 0).astype(np.uint64)
            xh = (((eq & p) + p) ^ p) | eq
            ph = mm | ~(xh | p)
            mh = p & xh
            hout = (ph & high[w] != 0).astype(np.int64) - (mh & high[w] != 0).astype(np.int64)
            ph = (ph << one) | (hin > 0).astype(np.uint64)
            mh = (mh << one) | (hin < 0).astype(np.uint64)
            pv[w, :live] = mh | ~(xv | ph)
            mv[w, :live] = ph & xv
            hin = hout
        score[:live] += hin
    out = np.empty(n_corpus, np.int64)
    out[order] = score
    return out


def edit_similarity(queries, corpus):
    """(n_queries, n_corpus) 1 - Levenshtein distance / length of the longer string."""
    lengths = torch.tensor([len(s) for s in corpus], dtype=torch.float64)
    rows = []
    for q in progress(queries, "edit distance"):
        d = torch.from_numpy(edit_distances(q, corpus)).double()
        rows.append(1 - d / torch.clamp(torch.maximum(lengths, torch.tensor(float(len(q)))), min=1))
    return torch.stack(rows) if rows else torch.empty(0, len(corpus), dtype=torch.float64)


def jaccard_similarity(queries, corpus):
    """(n_queries, n_corpus) Jaccard index of the strings' sets of characters."""
    vocab = {c: i for i, c in enumerate(sorted(set("".join(queries)) | set("".join(corpus))))}

    def onehot(texts):
        x = torch.zeros(len(texts), len(vocab))
        for i, s in enumerate(texts):
            x[i, [vocab[c] for c in set(s)]] = 1
        return x
    q, c = onehot(queries), onehot(corpus)
    inter = q @ c.T
    union = q.sum(1, keepdim=True) + c.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), 0.0).double()


WORD = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf々〆ヵヶ]+|[\u3041-\u309f]+|[\u30a1-\u30faー]+|[A-Za-zＡ-Ｚａ-ｚ]+"
                  r"|[0-9０-９]+|\S")


def words(text):
    """Word-level units: maximal runs of kanji, hiragana, katakana, Latin letters or digits; any other
    non-space character alone (Japanese has no spaces; this needs no dictionary)."""
    return WORD.findall(text)


def as_word_strings(texts):
    """Each text as a string of one character per word (a private code per distinct word), so that the
    character-level edit distance and Jaccard index become word-level ones."""
    codes = {}
    return ["".join(chr(0x20000 + codes.setdefault(w, len(codes))) for w in words(t)) for t in texts]


BASELINES = {"edit distance": edit_similarity, "Jaccard": jaccard_similarity}
UNITS = {"char": lambda texts: texts, "word": as_word_strings}

# -----------------------------------------------------------------------------------------------------------
# model computations


def embedding_progress(batches):
    return progress(batches, "embedding")


def retrieval_scores(model, tokenizer, path, limit=None, max_len=8192, token_budget=16384):
    """Zero-shot MIRACL-style retrieval (Table 4): Recall@10 and MRR@10 of each query's own passage among all
    passages, by dot product of normalised mean-pooled embeddings."""
    pairs = read_miracl_pairs(path, limit)
    q = embedded(model, tokenizer, [a for a, _ in pairs], max_len, token_budget)
    c = embedded(model, tokenizer, [b for _, b in pairs], max_len, token_budget)
    recall, mrr = recall_mrr(q @ c.T)
    return {"recall@10": recall, "mrr@10": mrr, "n_queries": len(pairs)}


def draw_positions(docs, special_ids, n, seed):
    """For each document, n positions drawn with replacement from its non-special positions."""
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor(sorted(special_ids))
    out = []
    for i, ids in enumerate(docs):
        candidates = torch.nonzero(~torch.isin(ids, specials)).flatten()
        if len(candidates) == 0:
            raise Problem(f"document {i} has no token to mask")
        out.append(candidates[torch.randint(len(candidates), (n,), generator=g)])
    return out


@torch.no_grad()
def pseudo_perplexity(model, docs, positions, mask_id, token_budget=16384, desc="pseudo-perplexity"):
    """PPL of each document (1-D id tensors with their special tokens) = exp(mean cross-entropy of the masked
    token over its copies), one copy per drawn position with that one position masked (mask_id: the
    tokenizer's). Copies of the same position are identical, so each distinct copy runs once and is weighted by
    its count. Copies are packed without padding up to `token_budget` tokens per forward and only the masked
    tokens are decoded."""
    device = device_of(model)
    copies = []  # (document, position, count)
    for d, pos in enumerate(positions):
        uniq, counts = pos.unique(return_counts=True)
        copies += [(d, p, c) for p, c in zip(uniq.tolist(), counts.tolist())]
    ce_sum = torch.zeros(len(docs), dtype=torch.float64)
    bar = Progress(desc, total=len(copies))
    for group in by_budget([len(docs[d]) for d, _, _ in copies], token_budget):
        batch = [copies[i] for i in group]
        ids, cu, m = pack([docs[d] for d, _, _ in batch], device)
        at = cu[:-1].long() + torch.tensor([p for _, p, _ in batch], device=device)  # masked positions in the stream
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[at] = ids[at]
        ids = ids.index_fill(0, at, mask_id)
        logits, _ = model(ids, labels=labels, cu_seqlens=cu, max_seqlen=m)  # (len(batch), V), in stream order
        ce = F.cross_entropy(logits.float(), labels[at], reduction="none").double().cpu()
        weights = torch.tensor([c for _, _, c in batch], dtype=torch.float64)
        ce_sum.index_add_(0, torch.tensor([d for d, _, _ in batch]), ce * weights)
        bar.update(len(batch))
    bar.close()
    n = torch.tensor([len(p) for p in positions], dtype=torch.float64)
    return torch.exp(ce_sum / n).tolist()


# -----------------------------------------------------------------------------------------------------------
# tasks: each returns (settings, {model name: results}, table rows) for one report


def val_sequences(path, e, max_len, limit, shards):
    """The val split of our shards as "<CLS> doc <SEP>" truncated to max_len, or the reason it cannot serve
    model e (its tokenizer did not make them). `shards` caches the split per tokenizer."""
    if not isinstance(e.tok, Tokenizer):
        return "the shards hold ids of the sentencepiece tokenizer that `data.py prepare` used, not of its " \
               "transformers tokenizer (give --data a jsonl of {\"text\"})"
    try:
        load_manifest(path, e.tok)
    except Problem as err:
        return f"{err} (give --data a jsonl of {{\"text\"}})"
    if e.tok.sha256 not in shards:
        shards[e.tok.sha256] = Shards(path, "val", tokenizer=e.tok)
    split = shards[e.tok.sha256]
    n = len(split) if limit is None else min(limit, len(split))
    return [torch.tensor([e.tok.cls_id] + split[i][:max_len - 2].tolist() + [e.tok.sep_id]) for i in range(n)]


def task_mlm(args, entries):
    """Masked-token loss and accuracy on held-out text: our shards' val split, or a jsonl of {"text"}."""
    path = Path(args.data or DEMO / "shards")
    if path.is_dir():
        load_manifest(path)  # a missing or damaged manifest stops every model; a tokenizer mismatch only its own
    results, shards = {}, {}
    for e in entries:
        max_len = e.max_len(args, 512)
        if path.is_dir():  # our shards: the held-out split, documents stored without <CLS>/<SEP>
            seqs = val_sequences(path, e, max_len, args.limit, shards)
            if isinstance(seqs, str):
                results[e.name] = not_applicable("mlm", e.name, seqs)
                continue
        else:
            seqs = [torch.tensor(e.tok.encode_pair(t, max_len=max_len)) for _, t in read_texts(path, args.limit)]
        g = torch.Generator().manual_seed(args.seed)
        masked = [mask_tokens(s, e.tok.special_ids, e.tok.mask_id, e.tok.vocab_size, g, p=args.mlm_probability)
                  for s in seqs]
        loss_sum, correct, count = 0.0, 0, 0
        for group in progress(list(by_budget([len(s) for s in seqs], args.token_budget)), f"mlm {e.name}"):
            x, cu, m = pack([masked[i][0] for i in group], device_of(e.model))
            y = torch.cat([masked[i][1] for i in group]).to(x.device)
            with torch.no_grad():
                logits, _ = e.model(x, labels=y, cu_seqlens=cu, max_seqlen=m)  # (masked tokens, V)
            target = y[y != IGNORE_INDEX]
            loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
            count += len(target)
        if count == 0:
            raise Problem(f"{path}: no tokens to mask")
        results[e.name] = {"loss": loss_sum / count, "accuracy": correct / count, "masked_tokens": count,
                           "sequences": len(seqs), "max_len": max_len}
    settings = {"data": str(path), "mlm_probability": args.mlm_probability, "seed": args.seed,
                "limit": args.limit, "masking": "data.mask_tokens (80/10/10), fixed seed, the tokenizer's ids"}
    rows = [("loss", table_cells(results, entries, lambda r: f"{r['loss']:.4f}")),
            ("accuracy", table_cells(results, entries, lambda r: f"{r['accuracy']:.4f}")),
            ("masked tokens", table_cells(results, entries, lambda r: str(r["masked_tokens"])))]
    return settings, results, rows


def task_ppl(args, entries):
    """Pseudo-perplexity against sequence length (Section 5 and Figure 2; NeoBERT's method). A model scores the
    bins whose longest documents fit in its positions; every bin it scores must hold a document."""
    path, edges = args.data or DEMO / "wiki.jsonl", parse_edges(args.bins)
    samples = {}  # models sharing a tokenizer are scored on the same documents
    for e in entries:
        if e.tok.sha256 not in samples:
            samples[e.tok.sha256] = sample_by_length(e.tok, path, edges, args.docs_per_bin, args.seed, args.limit)
    fits = {e.name: [hi <= e.max_positions for hi in edges[1:]] for e in entries}
    for e in entries:  # before any model runs
        bins, unmaskable = samples[e.tok.sha256]
        for b, items in enumerate(bins):
            if fits[e.name][b] and not items:
                why = f", {unmaskable['per_bin'][b]} with nothing to mask" if unmaskable["per_bin"][b] else ""
                raise Problem(f"{path}: no document of {bin_label(edges, b)} tokens to score (tokenizer {e.tok_path}"
                              f"{why}); give other --bins or read more records (--limit)")
    results = {}
    for e in entries:
        bins, unmaskable = samples[e.tok.sha256]
        if not any(fits[e.name]):
            why = f"every bin of --bins {args.bins} holds documents longer than its {e.max_positions} positions"
            results[e.name] = not_applicable("ppl", e.name, why)
            continue
        if not all(fits[e.name]):
            print(f"ppl: {e.name}: bins {', '.join(bin_label(edges, b) for b, ok in enumerate(fits[e.name]) if not ok)}"
                  f" hold documents longer than its {e.max_positions} positions; not scored for this model", flush=True)
        scored = [(b, doc_id, ids) for b, items in enumerate(bins) if fits[e.name][b] for doc_id, ids in items]
        docs = [ids for _, _, ids in scored]
        positions = draw_positions(docs, e.tok.special_ids, args.positions, args.seed)
        # the documents shared over the ranks by their cost: tokens x distinct masked copies
        ppl = spread(lambda share: pseudo_perplexity(e.model, [d for d, _ in share], [p for _, p in share],
                                                     e.tok.mask_id, args.token_budget, f"ppl {e.name}"),
                     list(zip(docs, positions)), [len(d) * len(p.unique()) for d, p in zip(docs, positions)])
        per_doc = [{"id": doc_id, "bin": b, "length": len(ids), "ppl": p} for (b, doc_id, ids), p in zip(scored, ppl)]
        results[e.name] = {"bins": [bin_summary(edges, b, [d["ppl"] for d in per_doc if d["bin"] == b])
                                    if fits[e.name][b] else {"range": [edges[b], edges[b + 1]], "n": 0,
                                                             "not_scored": f"longer than {e.max_positions} positions"}
                                    for b in range(len(edges) - 1)],
                           "docs": per_doc, "nothing_to_mask": unmaskable}
    settings = {"data": str(path), "bins": edges, "bin_rule": "(lo, hi], the first bin including 0; length counts "
                "<CLS> and <SEP>; longer documents are not used", "docs_per_bin": args.docs_per_bin,
                "positions": args.positions, "seed": args.seed, "limit": args.limit,
                "ppl": "exp(mean cross-entropy over the masked copies), one position masked per copy",
                "nothing_to_mask": "documents whose every token is special or unknown are skipped and counted "
                                   "(per bin, with the first ids)",
                "positions_limit": "a model scores only the bins whose upper edge fits in its positions"}
    rows = []
    for b in range(len(edges) - 1):
        rows.append((bin_label(edges, b), table_cells(results, entries, lambda r: f"{r['bins'][b]['mean_ppl']:.3f} "
                                                       f"(n={r['bins'][b]['n']})" if r["bins"][b]["n"] else "n/a")))
    rows.append(("skipped: nothing to mask", [str(sum(samples[e.tok.sha256][1]["per_bin"])) for e in entries]))
    return settings, results, rows


def bin_label(edges, b):
    return f"{'[' if b == 0 else '('}{edges[b]}, {edges[b + 1]}]"


def bin_summary(edges, b, values):
    return {"range": [edges[b], edges[b + 1]], "n": len(values),
            "mean_ppl": float(np.mean(values)) if values else None,
            "median_ppl": float(np.median(values)) if values else None}


def read_prompts(path):
    prompts = []
    if not Path(path).is_file():
        raise Problem(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.count("{}") != 1:
                raise Problem(f"{path}:{lineno}: a prompt needs exactly one {{}} where the mask goes")
            prompts.append(line)
    if not prompts:
        raise Problem(f"{path}: no prompts")
    return prompts


PLACEHOLDER = "\ue000"  # a private-use character: no vocabulary has it, so it never merges with its neighbours
# How a prompt becomes input ids (--mask_input). Table 3's numbers came from "hf": the released script writes the
# tokenizer's mask string into the prompt and gives it to the model's Hugging Face tokenizer, which tokenizes
# the text on each side of a special token as a text of its own; llm-jp's starts each with the word-start
# piece "▁" (as sentencepiece starts a text), so the text after the mask begins with one.
MASK_INPUTS = {
    "hf": "as the paper's released script (Table 3): the text on each side of the mask tokenized as a text of its "
          "own, so a word-start piece begins the text after the mask (1年は<MASK> ▁ ヶ月 です。)",
    "plain": "the prompt tokenized as one running text, as in pretraining, the mask in place of the pieces of {} "
             "(1年は<MASK> ヶ月 です。)",
}


def prompt_ids(tok, prompt, mask_input="hf"):
    """<CLS> prompt <SEP> with <MASK> at "{}", as MASK_INPUTS[mask_input] says. A transformers tokenizer reads
    its own mask string in the text ("hf") whichever is asked: how it splits text around a special token is
    its own (whole words for BERT's). "plain" tokenizes the prompt with a placeholder character at "{}" whose
    pieces then become the mask, so the words around it are tokenized as in running text."""
    if isinstance(tok, TransformersTokenizer):
        return tok.prompt_ids(prompt)
    before, after = prompt.split("{}")
    if mask_input == "hf":
        return [tok.cls_id] + tok.encode(before) + [tok.mask_id] + tok.encode(after) + [tok.sep_id]
    ids, marker = tok.encode(prompt.replace("{}", PLACEHOLDER)), tok.encode(PLACEHOLDER)
    for m in (marker, marker[1:]):  # with and without the start-of-text "▁"
        for i in range(len(ids) - len(m) + 1):
            if ids[i:i + len(m)] == m:
                return [tok.cls_id] + ids[:i] + [tok.mask_id] + ids[i + len(m):] + [tok.sep_id]
    raise Problem(f"prompt {prompt!r}: cannot place the mask (the tokenizer merged the placeholder)")


def mask_input_of(args, e):
    return "hf" if isinstance(e.tok, TransformersTokenizer) else args.mask_input


def pieces(tok, ids):
    """The tokens of ids as the vocabulary writes them (sentencepiece's "▁" shown, unlike in decoded text)."""
    return tok.pieces(ids) if isinstance(tok, TransformersTokenizer) else [tok.sp.id_to_piece(int(i)) for i in ids]


def fillmask_prompts(args, e):
    """--data's prompts; else Table 3's six, then, for a model with the demo tokenizer, the demo's own."""
    if args.data:
        return read_prompts(args.data)
    demo_prompts, demo_tok = DEMO / "fillmask.txt", DEMO / "tokenizer.model"
    if demo_prompts.is_file() and demo_tok.is_file() and Tokenizer(demo_tok).sha256 == e.tok.sha256:
        return PAPER_PROMPTS + [p for p in read_prompts(demo_prompts) if p not in PAPER_PROMPTS]
    return PAPER_PROMPTS


@torch.no_grad()
def task_fillmask(args, entries):
    """Predictions for the masked token of each prompt (Table 3: top-1; the top k are kept in the report), the
    prompt given as --mask_input says."""
    results = {}
    for e in entries:
        if args.mask_input != "hf" and isinstance(e.tok, TransformersTokenizer):
            print(f"fillmask: {e.name}: a transformers tokenizer places its own mask string (--mask_input hf); "
                  f"--mask_input {args.mask_input} applies to sentencepiece tokenizers", flush=True)
        out = []
        for prompt in fillmask_prompts(args, e):
            ids = torch.tensor(prompt_ids(e.tok, prompt, args.mask_input))
            if (ids == e.tok.mask_id).sum() != 1:
                raise Problem(f"prompt {prompt!r}: the tokenizer of {e.name} does not give exactly one mask token")
            if len(ids) > e.max_positions:
                why = f"prompt {abbreviated(prompt)!r} is {len(ids)} tokens, over its {e.max_positions} positions"
                out.append({"prompt": prompt, **not_applicable("fillmask", e.name, why)})
                continue
            labels = torch.where(ids == e.tok.mask_id, ids, IGNORE_INDEX)  # decode the masked position only
            x, cu, m = pack([ids], device_of(e.model))
            logits, _ = e.model(x, labels=labels.to(x.device), cu_seqlens=cu, max_seqlen=m)  # (1, V)
            probs = logits[0, :e.tok.vocab_size].float().softmax(-1)
            p, top = probs.topk(args.topk)
            out.append({"prompt": prompt, "input": pieces(e.tok, ids.tolist()),
                        "top": [{"token": e.tok.decode([t]), "id": t, "prob": v}
                                for t, v in zip(top.tolist(), p.tolist())]})
        results[e.name] = out
    settings = {"prompts": str(args.data or "Table 3's six prompts (and the demo's for a demo model)"),
                "topk": args.topk, "table": "top-1 as in Table 3",
                "mask_input": {"asked": args.mask_input, "what": MASK_INPUTS[args.mask_input],
                               "per_model": {e.name: mask_input_of(args, e) for e in entries}}}
    prompts = max((r for r in results.values()), key=len)

    def top1(e, i):
        if i >= len(results[e.name]):
            return "-"
        r = results[e.name][i]
        return "n/a" if "not_applicable" in r else r["top"][0]["token"] or "∅"
    rows = [(abbreviated(r["prompt"]), [top1(e, i) for e in entries]) for i, r in enumerate(prompts)]
    why = {"hf": "hf (Table 3's input)", "plain": "plain (running text)"}
    rows.append(("mask input (--mask_input)", [why[mask_input_of(args, e)] for e in entries]))
    return settings, results, rows


def abbreviated(text, n=24):
    return text if len(text) <= n else text[:n - 1] + "…"


def task_retrieval(args, entries):
    """MIRACL-style zero-shot retrieval with the edit-distance and Jaccard baselines (Table 4; the baselines'
    definitions are ours, see the top of this file)."""
    path = args.data or DEMO / "miracl.jsonl"
    results = {e.name: {**retrieval_scores(e.model, e.tok, path, args.limit, e.max_len(args), args.token_budget),
                        "max_len": e.max_len(args)} for e in entries}
    baselines = {}
    pairs = read_miracl_pairs(path, args.limit)
    for unit in args.baselines:
        texts = UNITS[unit]([q for q, _ in pairs] + [c for _, c in pairs])  # one word code for both sides
        queries, corpus = texts[:len(pairs)], texts[len(pairs):]
        for name, fn in BASELINES.items():  # the rows of the queries shared over the ranks
            recall, mrr = recall_mrr(spread(lambda share: fn(share, corpus), queries, [len(q) for q in queries]))
            baselines[f"{name} ({unit})"] = {"recall@10": recall, "mrr@10": mrr, "n_queries": len(pairs)}
    subset = "all records" if args.limit is None else f"first {args.limit} records, --limit"
    settings = {"data": str(path), "limit": args.limit, "subset": subset,
                "pairs": "items with >= 2 positives: query = positive[0].text, corpus entry = positive[1].text",
                "embedding": "mean pooling, L2-normalised, dot product; texts truncated at max_len tokens",
                "ties": "count against the query",
                "baselines": "1 - Levenshtein distance / longer length; Jaccard index of the sets of units; "
                             "units = characters (char) or runs of one script (word)"}
    results = {**results, **{f"[{k}]": v for k, v in baselines.items()}}
    rows = [(metric, [f"{results[e.name][metric]:.3f}" for e in entries]) for metric in ("recall@10", "mrr@10")]
    for name, r in baselines.items():
        rows += [(f"[{name}] {metric}", [f"{r[metric]:.3f}"] + [""] * (len(entries) - 1))
                 for metric in ("recall@10", "mrr@10")]
    rows.append((f"queries ({subset})", [str(len(pairs))] * len(entries)))
    return settings, results, rows


JGLUE = {  # task -> (text fields, labels; None = regression)
    "jsts": (("sentence1", "sentence2"), None),
    "jnli": (("sentence1", "sentence2"), ("entailment", "contradiction", "neutral")),
    "jcola": (("sentence",), (0, 1)),
}
MAIN_METRIC = {"jsts": "pearson", "jnli": "accuracy", "jcola": "accuracy"}


def version_key(path):
    return [int(x) for x in re.findall(r"\d+", path.name)]


def jglue_files(task, jglue_root, jcola_root, version=None):
    """(train, valid, version) of a task in the JGLUE / JCoLA repositories' layout: JGLUE's `version`
    (e.g. "v1.1"), else the newest version present."""
    if task == "jcola":
        root, version = Path(jcola_root), "v1.0"
        files = [root / "data" / "jcola-v1.0" / f"in_domain_{s}-v1.0.json" for s in ("train", "valid")]
        where = "a JCoLA checkout (--jcola_data)"
    else:
        root = Path(jglue_root)
        versions = sorted(root.glob(f"datasets/{task}-v1.*"), key=version_key)
        if version is not None:
            versions = [d for d in versions if d.name == f"{task}-{version}"]
        if not versions:
            raise Problem(f"{root}: no datasets/{task}-{version or 'v1.*'}/ directory "
                          f"(expected a JGLUE checkout as --data)")
        d = versions[-1]
        version = d.name.split("-")[-1]
        files = [d / f"{s}-{version}.json" for s in ("train", "valid")]
        where = "a JGLUE checkout (--data)"
    for f in files:
        if not f.is_file():
            raise Problem(f"{f}: missing (expected {where})")
    return files[0], files[1], version


def read_jglue(path, task, tok, max_len, limit):
    """[(ids, label)] of a JGLUE / JCoLA file: "<CLS> s1 <SEP> [s2 <SEP>]" truncated to max_len."""
    keys, labels = JGLUE[task]
    out = []
    for lineno, r in jsonl_records(path, limit):
        texts = [record_field(r, k, path, lineno) for k in keys]
        label = record_field(r, "label", path, lineno, (int, float, str))
        if labels is None:
            try:
                label = float(label)
            except ValueError:
                raise Problem(f"{path}:{lineno}: field 'label' is {label!r}, not a number")
            if not math.isfinite(label):
                raise Problem(f"{path}:{lineno}: field 'label' is {label}, not a finite number")
        elif label not in labels:
            raise Problem(f"{path}:{lineno}: field 'label' is {label!r}, not one of {', '.join(map(repr, labels))}")
        else:
            label = labels.index(label)
        out.append((torch.tensor(tok.encode_pair(*texts, max_len=max_len)), label))
    return out


def classifier(mlm, num_labels):
    """A fresh classifier on the pretrained encoder, pooling as the model's config says."""
    if isinstance(mlm, TransformersMLM):
        return TransformersClassifier(mlm, num_labels)
    return ModernBertForSequenceClassification.from_mlm(mlm, num_labels, pooling=mlm.config.classifier_pooling)


@torch.no_grad()
def predict(clf, examples, batch_size=64):
    clf.eval()
    preds = []
    for i in range(0, len(examples), batch_size):
        ids, cu, m = pack([x for x, _ in examples[i:i + batch_size]], device_of(clf))
        logits, _ = clf(ids, cu_seqlens=cu, max_seqlen=m)
        preds.append(logits.float().cpu())
    logits = torch.cat(preds)
    return logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()


def jglue_metrics(task, pred, gold):
    """Scores x100 as in the paper's Table 2."""
    if task == "jsts":
        return {"pearson": 100 * pearson(pred, gold), "spearman": 100 * spearman(pred, gold)}
    acc = 100 * float(np.mean(np.asarray(pred) == np.asarray(gold)))
    return {"accuracy": acc, "mcc": 100 * mcc(pred, gold)} if task == "jcola" else {"accuracy": acc}


def finetune(mlm, task, train, valid, lr, epochs, score_at, batch_size, seed, desc):
    """Fine-tune a fresh classifier from the MLM weights for `epochs` epochs: AdamW (0.9, 0.999, eps 1e-8), no
    weight decay, no warmup, no gradient clipping, the learning rate decaying linearly to 0 over the `epochs`
    epochs (as the released scripts). Batches are packed (no padding). Scores the validation set after each
    epoch in `score_at`. -> {epoch: metrics}."""
    torch.manual_seed(seed)
    labels = JGLUE[task][1]
    regression = labels is None
    clf = classifier(mlm, 1 if regression else len(labels))
    optimizer = torch.optim.AdamW(clf.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total = math.ceil(len(train) / batch_size) * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    g = torch.Generator().manual_seed(seed)
    device, scores = device_of(clf), {}
    bar = Progress(desc, total=total)
    for epoch in range(1, epochs + 1):
        clf.train()
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(train), batch_size):
            batch = [train[j] for j in order[i:i + batch_size]]
            ids, cu, m = pack([x for x, _ in batch], device)
            y = torch.tensor([y for _, y in batch], dtype=torch.float32 if regression else torch.long, device=device)
            _, loss = clf(ids, labels=y, cu_seqlens=cu, max_seqlen=m)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
        if epoch in score_at:
            scores[epoch] = jglue_metrics(task, predict(clf, valid), [y for _, y in valid])
    bar.close()
    return scores


GRIDS = {"paper": "one independent run per (learning rate, epoch count), each decaying over its own epochs "
                  "and scored at its end (Table 2's protocol)",
         "per_lr": "one run per learning rate, decaying over the longest epoch count and scored after each listed "
                   "epoch (fewer runs; shorter epoch counts see a partly decayed learning rate)"}


def grid_runs(args):
    """The fine-tuning runs of the grid (GRIDS[args.grid]): [(lr, epochs run, epochs scored)]."""
    epochs = sorted(set(args.epochs))
    if args.grid == "paper":
        return [(lr, run, {run}) for lr in args.lrs for run in epochs]
    return [(lr, max(epochs), set(epochs)) for lr in args.lrs]


def jglue_grid(args, e, task, train, valid):
    """Every run of the grid of one task -> [{lr, epochs, metrics...}]."""
    return jglue_grids(args, e, {task: (train, valid)})[task]


def jglue_grids(args, e, sets):
    """Every run of the grid of each task of sets {task: (train, valid)}, dealt to the ranks longest first (train
    examples x epochs). Each run is seeded alike (--seed, before the classifier is made), so its numbers do not
    depend on the rank that runs it nor on the runs before it. -> {task: [{lr, epochs, metrics...}]}"""
    runs = [(t, lr, n, score_at) for t in sets for lr, n, score_at in grid_runs(args)]

    def run(share):
        scores = []
        for t, lr, n, score_at in share:
            try:
                scores.append(finetune(e.model, t, *sets[t], lr, n, score_at, args.jglue_batch_size, args.seed,
                                       f"{t} lr {lr:g} {n} epochs {e.name}"))
            except NotApplicable as err:  # the same for every run: known to every rank once gathered
                return [{"not_applicable": str(err)}] * len(share)
        return scores
    scores = spread(run, runs, [len(sets[t][0]) * n for t, _, n, _ in runs])
    for s in scores:
        if "not_applicable" in s:
            raise NotApplicable(s["not_applicable"])
    return {t: [{"lr": lr, "epochs": ep, **m} for (task, lr, _, _), s in zip(runs, scores) if task == t
                for ep, m in s.items()] for t in sets}


def task_jglue(args, entries):
    """JGLUE fine-tuning (JSTS, JNLI, JCoLA) over the LR x epoch grid; the best validation score per task and
    Table 2's average of the three."""
    tasks = [t.strip().lower() for t in args.tasks.split(",")]
    for t in tasks:
        if t not in JGLUE:
            raise Problem(f"--tasks {args.tasks}: unknown task {t!r}; known: {', '.join(JGLUE)}")
    files = {t: jglue_files(t, args.data or DEMO / "JGLUE", args.jcola_data or DEMO / "JCoLA", args.jglue_version)
             for t in tasks}
    results = {}
    for e in entries:
        try:
            results[e.name] = jglue_model(args, e, tasks, files)
        except NotApplicable as err:
            results[e.name] = not_applicable("jglue", e.name, str(err))
    settings = {"tasks": tasks, "versions": {t: files[t][2] for t in tasks},
                "files": {t: [str(f) for f in files[t][:2]] for t in tasks}, "grid": args.grid, "lrs": args.lrs,
                "epochs": sorted(set(args.epochs)), "batch_size": args.jglue_batch_size,
                "max_len": {e.name: e.max_len(args, 512) for e in entries},
                "seed": args.seed, "limit": args.limit, "runs": GRIDS[args.grid],
                "optimizer": "AdamW betas (0.9, 0.999), eps 1e-8, no weight decay, no warmup, no clipping",
                "best": "highest validation score per task: JSTS Pearson, JNLI accuracy, JCoLA accuracy",
                "average": "mean of the best JSTS Pearson, JNLI accuracy and JCoLA accuracy (Table 2), "
                           "when all three ran"}
    rows = []
    for t in tasks:
        for metric in (("pearson", "spearman") if t == "jsts" else ("accuracy", "mcc") if t == "jcola" else ("accuracy",)):
            rows.append((f"{t.upper()} {metric}",
                         table_cells(results, entries, lambda r: f"{r[t]['best'][metric]:.1f}")))
        if t != "jsts":
            rows.append((f"{t.upper()} majority-label accuracy",
                         table_cells(results, entries, lambda r: f"{r[t]['majority_baseline']['accuracy']:.1f}")))
        rows.append((f"{t.upper()} best lr/epochs",
                     table_cells(results, entries, lambda r: f"{r[t]['best']['lr']:g}/{r[t]['best']['epochs']}")))
    if set(tasks) == set(JGLUE):
        rows.append(("average", table_cells(results, entries, lambda r: f"{r['average']:.1f}")))
    return settings, results, rows


def jglue_model(args, e, tasks, files):
    """One model's JGLUE results: per task the best of the grid, every run, the majority baseline."""
    res, sets = {}, {}
    for t in tasks:
        sets[t] = [read_jglue(f, t, e.tok, e.max_len(args, 512), args.limit) for f in files[t][:2]]
    grids = jglue_grids(args, e, sets)  # every task's runs together: more to share over the ranks
    for t in tasks:
        (train, valid), grid = sets[t], grids[t]
        best = max(grid, key=lambda r: r[MAIN_METRIC[t]])
        res[t] = {"best": best, "grid": grid, "train": len(train), "valid": len(valid)}
        if t != "jsts":  # what always answering the most frequent training label scores
            majority = max(set(y for _, y in train), key=[y for _, y in train].count)
            res[t]["majority_baseline"] = jglue_metrics(t, [majority] * len(valid), [y for _, y in valid])
    if set(tasks) == set(JGLUE):
        res["average"] = float(np.mean([res[t]["best"][MAIN_METRIC[t]] for t in tasks]))
    return res


def pair_texts(args):
    """Positive pairs (MIRACL) and n random pairs: distinct --wiki documents drawn at random (Figures 3-4), or
    without --wiki, the query of one item and the passage of another (texts like the positives')."""
    path = args.data or DEMO / "miracl.jsonl"
    every = read_miracl_pairs(path, args.limit)
    rng = random.Random(args.seed)
    if args.wiki:
        texts = [t for _, t in read_texts(args.wiki, args.limit)]
        n = min(args.pairs, len(texts) // 2)
        chosen = rng.sample(range(len(texts)), 2 * n)
        randoms = [(texts[chosen[i]], texts[chosen[n + i]]) for i in range(n)]
    else:
        n = min(args.pairs, len(every)) if len(every) > 1 else 0
        randoms = []
        for i in rng.sample(range(len(every)), n):
            j = rng.choice([j for j in range(len(every)) if j != i])
            randoms.append((every[i][0], every[j][1]))
    if n == 0:
        raise Problem(f"{args.wiki or path}: fewer than two texts for random pairs")
    return every[:args.pairs], randoms


def random_pairs(args, task):
    """Which random pairs a run uses, for its report and table; without --wiki, one line saying they are not the
    paper's."""
    if args.wiki:
        return {"source": "wiki", "as_paper": True, "file": str(args.wiki),
                "what": "two distinct documents of --wiki drawn at random, as the paper's random Wikipedia articles"}
    print(f"{task}: random pairs are MIRACL queries against other items' passages, not the paper's random Wikipedia "
          f"articles (Figures 3-4, longer texts), so the values are not comparable to the paper's; give --wiki "
          f"jawiki.jsonl for those", flush=True)
    return {"source": "miracl", "as_paper": False, "file": str(args.data or DEMO / "miracl.jsonl"),
            "what": "the query of one item and the positive passage of another (give --wiki for the paper's "
                    "random Wikipedia articles)"}


def random_pairs_row(pairs, entries):
    label = "--wiki (as the paper)" if pairs["as_paper"] else "MIRACL, not the paper's"
    return ("random pairs", [label] * len(entries))


def pair_embeddings(e, pairs, args):
    a = embedded(e.model, e.tok, [x for x, _ in pairs], e.max_len(args), args.token_budget)
    b = embedded(e.model, e.tok, [y for _, y in pairs], e.max_len(args), args.token_budget)
    return a, b


def pair_settings(args, entries, pairs):
    return {"positives": str(args.data or DEMO / "miracl.jsonl"), "random_pairs": pairs, "pairs": args.pairs,
            "limit": args.limit, "seed": args.seed,
            "max_len": {e.name: e.max_len(args) for e in entries},
            "embedding": "mean pooling, L2-normalised, of the text truncated at max_len tokens"}


def task_alignment(args, entries):
    """Alignment on positive pairs and uniformity (t = 2) on random texts (Figure 3)."""
    positives, randoms = pair_texts(args)
    pairs = random_pairs(args, "alignment")
    results = {}
    for e in entries:
        a, b = pair_embeddings(e, positives, args)
        x, y = pair_embeddings(e, randoms, args)
        results[e.name] = {"alignment": alignment(a, b), "uniformity": uniformity(torch.cat([x, y])),
                           "positive_pairs": len(positives), "random_texts": 2 * len(randoms),
                           "random_pairs": pairs["source"]}
    settings = {**pair_settings(args, entries, pairs), "t": 2,
                "uniformity": "over all pairs of distinct texts among the 2 x pairs random texts"}
    rows = [(k, [f"{results[e.name][k]:.4f}" for e in entries]) for k in ("alignment", "uniformity")]
    return settings, results, rows + [random_pairs_row(pairs, entries)]


MEASURES = {"distance": "squared distance 2 - 2 cos", "cosine": "cosine similarity"}


def task_simdist(args, entries):
    """Similarity of positive vs random pairs (Figure 4): per pair the cosine and the squared distance
    2 - 2 cos of the normalised embeddings, with histograms over bins fitted to the values (numpy's "auto")."""
    positives, randoms = pair_texts(args)
    random_source = random_pairs(args, "simdist")
    results = {}
    for e in entries:
        res = {}
        for name, pairs in (("positive", positives), ("random", randoms)):
            a, b = pair_embeddings(e, pairs, args)
            cos = (a.double() * b.double()).sum(-1).clamp(-1, 1).numpy()
            res[name] = {"cosine": cos.tolist(), "distance": (2 - 2 * cos).tolist()}
        for measure in MEASURES:
            both = np.array(res["positive"][measure] + res["random"][measure])
            edges = np.histogram_bin_edges(both, bins="auto")
            res[measure] = {"edges": edges.tolist(), **{kind: {
                "mean": float(np.mean(res[kind][measure])), "std": float(np.std(res[kind][measure])),
                "n": len(res[kind][measure]), "counts": np.histogram(res[kind][measure], edges)[0].tolist()}
                for kind in ("positive", "random")}}
        results[e.name] = {"pairs": {k: res[k] for k in ("positive", "random")},
                           **{m: res[m] for m in MEASURES}, "random_pairs": random_source["source"]}
    settings = {**pair_settings(args, entries, random_source), "measures": MEASURES,
                "bins": "numpy histogram_bin_edges 'auto' over the positive and random values together",
                "figure": args.measure}
    rows = [(f"{kind} {measure} {stat}", [f"{results[e.name][measure][kind][stat]:.4f}" for e in entries])
            for measure in MEASURES for kind in ("positive", "random") for stat in ("mean", "std")]
    return settings, results, rows + [random_pairs_row(random_source, entries)]


def task_lengths(args, entries):
    """Token-length distribution of the pseudo-perplexity sample (Figure 5; the documents task ppl uses)."""
    path, edges = args.data or DEMO / "wiki.jsonl", parse_edges(args.bins)
    results, samples = {}, {}
    for e in entries:
        if e.tok.sha256 not in samples:
            bins, unmaskable = sample_by_length(e.tok, path, edges, args.docs_per_bin, args.seed, args.limit)
            lengths = [len(ids) for b in bins for _, ids in b]
            hist_edges = np.linspace(0, edges[-1], args.hist_bins + 1)
            samples[e.tok.sha256] = {
                "n": len(lengths), "per_bin": [len(b) for b in bins], "lengths": lengths,
                "nothing_to_mask": unmaskable,
                "mean": float(np.mean(lengths)) if lengths else None,
                "median": float(np.median(lengths)) if lengths else None,
                "edges": hist_edges.tolist(), "counts": np.histogram(lengths, hist_edges)[0].tolist()}
        results[e.name] = {"tokenizer": e.tok_path, "tokenizer_sha256": e.tok.sha256, **samples[e.tok.sha256]}
    settings = {"data": str(path), "bins": edges, "docs_per_bin": args.docs_per_bin, "seed": args.seed,
                "limit": args.limit}
    rows = [(bin_label(edges, b), [str(results[e.name]["per_bin"][b]) for e in entries]) for b in range(len(edges) - 1)]
    rows += [(stat, [f"{results[e.name][stat]:.0f}" if results[e.name][stat] is not None else "-" for e in entries])
             for stat in ("mean", "median")]
    rows.append(("skipped: nothing to mask", [str(sum(results[e.name]["nothing_to_mask"]["per_bin"]))
                                              for e in entries]))
    return settings, results, rows


CURVES = ("loss", "val_loss", "val_acc", "recall@10", "mrr@10")


def run_dirs(args):
    """The training runs of the --model arguments: RUN for RUN/hf and RUN/ckpt_STEP, else the path itself."""
    return [Path(m).parent if Path(m).name == "hf" or re.fullmatch(r"ckpt_\d+", Path(m).name) else Path(m)
            for m in (args.model or [DEFAULT_MODEL])]


def metric_files(args):
    """-> (metrics.jsonl files to join, {model: why it has none}). --run names the runs, each of which must have
    one; else the run directories of the --model arguments that have one, each once."""
    if args.run:
        files = [Path(r) / "metrics.jsonl" if Path(r).is_dir() else Path(r) for r in args.run]
        for r, f in zip(args.run, files):
            if not f.is_file():
                raise Problem(f"--run {r}: no metrics.jsonl (give the training run directories)")
        return files, {}
    files, missing = [], {}
    for model, run in zip(args.model or [DEFAULT_MODEL], run_dirs(args)):
        f = run / "metrics.jsonl"
        if not f.is_file():
            missing[str(model)] = f"no metrics.jsonl in {run}: not a training run (give the runs with --run)"
        elif f not in files:
            files.append(f)
    if not files:
        raise Problem("--model: none of the models is a training run with a metrics.jsonl (give the runs with --run)")
    return files, missing


def task_curves(args, entries):
    """Training curves from metrics.jsonl (Figure 1); several runs (stage 1, stage 2) are joined in order, a run
    whose steps restart at 0 continuing after the previous one's last step. Its retrieval numbers are the
    training-time evaluation's (all records of its retrieval set), not task retrieval's."""
    files, missing = metric_files(args)
    points, starts, offset = {k: [] for k in CURVES}, [], 0
    for f in files:
        lines = list(jsonl_records(f))
        rows, steps = [r for _, r in lines], [record_field(r, "step", f, lineno, int) for lineno, r in lines]
        shift = offset if steps and min(steps) <= offset else 0
        starts.append(shift + (min(steps) if steps else 0))
        for r, s in zip(rows, steps):
            for k in CURVES:
                if isinstance(r.get(k), (int, float)):
                    points[k].append([s + shift, r[k]])
        offset = max([offset] + [s + shift for s in steps])
    results = {"runs": [str(f) for f in files], "stage_starts": starts, "points": points,
               "models_without_a_run": {m: not_applicable("curves", m, why) for m, why in missing.items()}}
    settings = {"runs": [str(f) for f in files], "join": "runs in the order given; a run whose steps restart "
                "continues after the previous run's last step", "retrieval": "as logged during training"}
    rows = [(f"{k} (training log)" if "@" in k else k, [f"{points[k][-1][1]:.4f} @ {points[k][-1][0]}" if points[k]
                                                         else "-"]) for k in CURVES]
    return settings, {"curves": results}, rows


# -----------------------------------------------------------------------------------------------------------
# figures (matplotlib, optional): one per task, every model in it


def plot_ppl(ax_grid, models, args):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, ax = ax_grid(1, 1, (8, 5))
    for i, (name, r) in enumerate(models.items()):
        if "not_applicable" in r:
            continue
        color = f"C{i}"
        ax.scatter([d["length"] for d in r["docs"]], [d["ppl"] for d in r["docs"]], s=6, alpha=0.4, color=color)
        means = [(sum(b["range"]) / 2, b["mean_ppl"]) for b in r["bins"] if b["n"]]
        if means:  # per-bin mean at the bin's centre
            ax.plot(*zip(*means), marker="o", color=color, label=name)
    ax.set(xlabel="sequence length (tokens)", ylabel="pseudo-perplexity", yscale="log")
    # ticks written plainly (1.5, 2, 5, 10, ...), not as 1.5x10^0; denser when the values span little
    lo, hi = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if hi / lo > 30 else (1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    return fig


def plot_lengths(ax_grid, models, args):
    fig, ax = ax_grid(1, 1, (8, 5))
    shown = {}  # one histogram per distinct tokenizer
    for r in models.values():
        shown.setdefault(r["tokenizer_sha256"], r)
    for r in shown.values():
        ax.hist(r["lengths"], bins=r["edges"], alpha=0.6, label=r["tokenizer"])
    ax.set(xlabel="sequence length (tokens)", ylabel="documents")
    ax.legend()
    return fig


def plot_alignment(ax_grid, models, args):
    fig, ax = ax_grid(1, 1, (6, 5))
    for name, r in models.items():
        ax.scatter(r["uniformity"], r["alignment"], s=40)
        ax.annotate(name, (r["uniformity"], r["alignment"]), fontsize=8)
    ax.set(xlabel="uniformity", ylabel="alignment")
    return fig


def plot_simdist(ax_grid, models, args):
    fig, axes = ax_grid(1, len(models), (6 * len(models), 4))
    for ax, (name, r) in zip(np.atleast_1d(axes), models.items()):
        h = r[args.measure]
        for kind in ("random", "positive"):
            ax.stairs(h[kind]["counts"], h["edges"], fill=True, alpha=0.5, label=kind)
        ax.set(title=name, xlabel=MEASURES[args.measure], ylabel="pairs")
        ax.legend()
    return fig


def plot_curves(ax_grid, models, args):
    r = models["curves"]
    fig, axes = ax_grid(1, 4, (20, 4))
    for ax, keys, label in zip(axes, (("loss", "val_loss"), ("val_acc",), ("recall@10",), ("mrr@10",)),
                               ("MLM loss", "validation accuracy", "Recall@10", "MRR@10")):
        for k in keys:
            if r["points"][k]:
                ax.plot(*zip(*r["points"][k]), label=k)
        for s in r["stage_starts"][1:]:
            ax.axvline(s, color="gray", linestyle="--")
        ax.set(xlabel="step", ylabel=label)
        if ax.lines:
            ax.legend()
    return fig


def plot(task, report, out, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    draw = TASKS[task][1]
    if draw is None:
        return None
    fig = draw(lambda rows, cols, size: plt.subplots(rows, cols, figsize=size), report["results"], args)
    fig.tight_layout()
    path = out / f"{task}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------------------------------------
# the paper's published numbers, and a report that sets a run's beside them

LLMJP = "llm-jp-modernbert-base"
# Exactly as printed in the paper, with the table each comes from.
PUBLISHED = {
    "jglue": {
        "source": "Table 2", "columns": ["JSTS", "JNLI", "JCoLA", "average"], "decimals": 1,
        "what": "best validation score over the fine-tuning grid x100: JSTS Pearson, JNLI and JCoLA accuracy, and "
                "their average",
        "rows": {"tohoku-nlp/bert-base-japanese-v3": [92.0, 91.2, 88.0, 90.4],
                 "sbintuitions/modernbert-ja-130m": [91.6, 92.7, 86.8, 90.4],
                 "sbintuitions/modernbert-ja-310m": [93.2, 93.3, 88.3, 91.6],
                 f"{LLMJP}, stage 1, 4k steps": [77.7, 68.4, 83.9, 76.7],
                 f"{LLMJP}, stage 1, 15k steps": [90.5, 89.0, 84.3, 87.9],
                 f"{LLMJP}, stage 1, 50k steps": [92.1, 92.0, 86.2, 90.1],
                 f"{LLMJP}, stage 1, 100k steps": [92.1, 91.8, 86.1, 90.0],
                 f"{LLMJP}, stage 1, 200k steps": [92.0, 92.7, 85.0, 89.9],
                 f"{LLMJP}, stage 1, 300k steps": [92.0, 91.9, 85.2, 89.7],
                 f"{LLMJP}, stage 1, 400k steps": [92.1, 92.0, 85.5, 89.9],
                 f"{LLMJP}, stage 1, 500k steps": [92.1, 92.0, 84.5, 89.5],
                 f"{LLMJP}, stage 2, 200k steps": [91.8, 91.3, 84.4, 89.2]}},
    "fillmask": {
        "source": "Table 3", "columns": ["top-1"], "what": f"{LLMJP}'s top-1 answer at the masked token",
        "rows": dict(zip(PAPER_PROMPTS, ["エベレスト", "COVID-19", "長江", "12", "サンキュー", "365"]))},
    "retrieval": {
        "source": "Table 4", "columns": ["Recall@10", "MRR@10"], "decimals": 3,
        "what": "zero-shot retrieval on MIRACL ja (train split), mean-pooled embeddings",
        "rows": {"cl-nagoya/ruri-large-v2": [0.987, 0.872], "tohoku-nlp/bert-base-japanese-v3": [0.740, 0.529],
                 "sbintuitions/modernbert-ja-130m": [0.506, 0.334], "edit distance": [0.289, 0.198],
                 "Jaccard": [0.031, 0.021]}},
}
FIGURES = {"curves": "Figure 1: training curves", "ppl": "Figure 2: pseudo-perplexity against length",
           "alignment": "Figure 3: alignment and uniformity", "simdist": "Figure 4: similarity of positive and "
           "random pairs", "lengths": "Figure 5: token lengths of the pseudo-perplexity sample"}


def provenance(name):
    """What a model of this run is: {"step", "stage", "demo"} of our runs (training.json, meta.json), else {}."""
    try:
        kind, where = checkpoint.resolve(name)
        meta = json.loads((where / ("training.json" if kind == "hf" else "meta.json")).read_text())
        config = meta["config"]
        dirs = config["data_dir"] if isinstance(config["data_dir"], dict) else [config["data_dir"]]  # a mixture's
        return {"step": meta["step"], "stage": 2 if config["max_seqlen"] > 1024 else 1,
                "demo": any(Path(d).parts[-3:-1] == ("data", "demo") for d in dirs) or config.get("demo_data", False)}
    except (Problem, OSError, ValueError, KeyError, TypeError):
        return {}


def paper_row(name, rows):
    """The row of a published table this model stands for: the same released model (by its name), or the row of
    llm-jp-modernbert-base at the same stage and step, else its last row (the final model)."""
    for row in rows:
        if "/" in row and row.split("/")[-1] in str(name):
            return row
    ours = [r for r in rows if r.startswith(LLMJP)]
    if not ours:
        return None
    origin = provenance(name)
    same = f"{LLMJP}, stage {origin.get('stage')}, {origin.get('step', 0) // 1000}k steps"
    return same if same in ours and origin.get("step", 0) % 1000 == 0 else ours[-1]


def caveats(task, report, name=None, row=None):
    """Lines saying why this run's numbers of a task are not comparable with the paper's."""
    s, lines = report["settings"], []
    if s.get("demo_data", True):
        lines.append("data: the demo's synthetic sets, not the paper's (give --data)")
    if s["profile"] != "paper":
        lines.append("protocol: the small settings for a CPU (--quick, or no GPU), not the paper's (--full)")
    if task in ("alignment", "simdist") and s["random_pairs"]["source"] != "wiki":
        lines.append("random pairs: from the positive set, not Wikipedia articles (give --wiki)")
    if task == "jglue":
        lines.append("JGLUE version read: " + ", ".join(f"{t} {v}" for t, v in s["versions"].items()))
    if task == "fillmask" and s["mask_input"]["per_model"].get(name, "hf") != "hf":
        lines.append(f"tokenizer input: --mask_input {s['mask_input']['per_model'][name]}, not Table 3's (hf)")
    if name is not None and row is not None:
        origin = provenance(name)
        if origin:
            lines.append(f"model and step: {name} is step {origin['step']} of a stage-{origin['stage']} run"
                         + (" on the demo data" if origin["demo"] else "") + f"; the paper's row: {row}")
        elif not row.split("/")[-1] in str(name) and not str(name).rstrip("/").endswith(LLMJP):
            lines.append(f"model and step: {name} is not the paper's model; compared with the row {row}")
    return lines


def published_table(task, report):
    """The paper's rows, this run's models' rows and their differences from the row each stands for."""
    table = PUBLISHED[task]
    if task == "fillmask":
        mine = {n: {r["prompt"]: r["top"][0]["token"] for r in rs if "top" in r} for n, rs in report["results"].items()}
        rows = [{"prompt": p, "paper": a, "run": {n: m.get(p) for n, m in mine.items()},
                 "same": {n: m.get(p) == a for n, m in mine.items() if p in m}} for p, a in table["rows"].items()]
        models = {n: {"row": LLMJP, "caveats": caveats(task, report, n, LLMJP)} for n in report["results"]}
        return {"source": table["source"], "what": table["what"], "rows": rows, "models": models,
                "caveats": caveats(task, report)}
    runs = {}
    for n, r in report["results"].items():
        if "not_applicable" in r:
            continue
        if task == "jglue":
            values = [r[t]["best"]["pearson" if t == "jsts" else "accuracy"] if t in r else None
                      for t in ("jsts", "jnli", "jcola")] + [r.get("average")]
        else:
            values = [r["recall@10"], r["mrr@10"]]
        row = paper_row(n, table["rows"]) if not n.startswith("[") else \
            next((k for k in table["rows"] if n[1:].lower().startswith(k.lower())), None)
        paper = table["rows"].get(row)
        runs[n] = {"values": values, "row": row, "caveats": caveats(task, report, n, row) if row else [],
                   "difference": [None if a is None or b is None else round(a - b, 6) for a, b in zip(values, paper)]
                   if paper else None}
    return {"source": table["source"], "what": table["what"], "columns": table["columns"],
            "decimals": table["decimals"], "paper": table["rows"], "run": runs, "caveats": caveats(task, report)}


def build_report(out, tasks):
    """{task: the paper's numbers beside this run's, with what makes them not comparable}, from the task files
    in out (this run's numbers exactly as written there)."""
    content = {}
    for task in [t for t in [*PUBLISHED, *FIGURES] if t in tasks]:  # Tables 2-4, then Figures 1-5
        path = Path(out) / f"{task}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        if task in PUBLISHED:
            content[task] = published_table(task, report)
        if task in FIGURES:
            figure = Path(out) / f"{task}.png"
            content.setdefault(task, {}).update({"figure": FIGURES[task], "caveats": caveats(task, report) if
                                                 task != "curves" else [],
                                                 "image": figure.name if figure.is_file() else None})
    return content


def write_report(out, content):
    """OUT/report.md: each table and figure of the paper this run covered, beside the published values."""
    fmt = lambda v: "-" if v is None else json.dumps(v, ensure_ascii=False).strip('"')  # as in the task files
    lines = ["# This run beside the paper", "",
             "Published values as printed in the llm-jp-modernbert paper; this run's as in its task files. "
             "Each section lists what makes the two not comparable.", ""]
    for task, c in content.items():
        if "source" in c:
            lines += [f"## {c['source']} ({task})", "", c["what"] + ".", ""]
            if task == "fillmask":
                names = list(c["models"])
                lines += ["| prompt | paper | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
                lines += [f"| {r['prompt']} | {r['paper']} | " + " | ".join(fmt(r["run"].get(n)) for n in names) + " |"
                          for r in c["rows"]]
                notes = [x for n in names for x in c["models"][n]["caveats"]]
            else:
                lines += ["| model | " + " | ".join(c["columns"]) + " |", "|---" * (1 + len(c["columns"])) + "|"]
                lines += [f"| paper: {k} | " + " | ".join(f"{v:.{c['decimals']}f}" for v in vals) + " |"
                          for k, vals in c["paper"].items()]  # as printed
                for n, r in c["run"].items():
                    lines.append(f"| this run: {n} | " + " | ".join(fmt(v) for v in r["values"]) + " |")
                    if r["difference"] is not None:
                        lines.append(f"| difference from {r['row']} | " + " | ".join(
                            "-" if d is None else f"{d:+.3g}" for d in r["difference"]) + " |")
                notes = [x for r in c["run"].values() for x in r["caveats"]]
            lines += ["", "Not comparable:" if c["caveats"] or notes else "Comparable settings.", ""]
            lines += [f"- {x}" for x in dict.fromkeys(c["caveats"] + notes)] + [""]
        if "figure" in c:
            lines += [f"## {c['figure']} ({task})", ""]
            lines += [f"![{c['figure']}]({c['image']})", ""] if c["image"] else ["(run with --plot for the figure)", ""]
            if "source" not in c:
                lines += [f"- {x}" for x in c["caveats"]] + ([""] if c["caveats"] else [])
    path = Path(out) / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


# -----------------------------------------------------------------------------------------------------------


def display_width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def print_table(title, columns, rows):
    """Rows of (label, one cell per column), aligned for a terminal (CJK characters are two columns wide)."""
    left = lambda s, w: s + " " * (w - display_width(s))
    right = lambda s, w: " " * (w - display_width(s)) + s
    width = max(display_width(label) for label, _ in [(title, None)] + rows)
    widths = [max([display_width(c)] + [display_width(cells[i]) for _, cells in rows if i < len(cells)])
              for i, c in enumerate(columns)]
    print(left(title, width) + "  " + "  ".join(right(c, w) for c, w in zip(columns, widths)))
    for label, cells in rows:
        print(left(label, width) + "  " + "  ".join(right(c, w) for c, w in zip(cells, widths)))


def write_json(path, obj):
    """Atomically: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def run_task(task, args, entries):
    """Run one task, write OUT/TASK.json (and the figure), print its table. -> (columns, rows)."""
    t0 = time.perf_counter()
    settings, results, rows = TASKS[task][0](args, entries)
    demo_data = not args.data or (task == "jglue" and "jcola" in settings["tasks"] and not args.jcola_data)
    report = {"task": task, "settings": {**settings, "profile": args.profile, "dtype": args.dtype,
                                         "demo_data": demo_data},
              "models": [e.name for e in entries], "results": results}
    out = Path(args.out)
    columns = ["final value @ step"] if task == "curves" else [e.name for e in entries]
    if ranks.rank():  # rank 0 writes
        return columns, rows
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.json"
    write_json(path, report)
    print_table(task, columns, rows)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    if args.plot and (figure := plot(task, report, out, args)):
        print(f"wrote {figure}")
    print()
    return columns, rows


# task -> (run, figure or None); run returns (settings, results, table rows)
TASKS = {
    "mlm": (task_mlm, None),
    "ppl": (task_ppl, plot_ppl),
    "fillmask": (task_fillmask, None),
    "retrieval": (task_retrieval, None),
    "jglue": (task_jglue, None),
    "alignment": (task_alignment, plot_alignment),
    "simdist": (task_simdist, plot_simdist),
    "lengths": (task_lengths, plot_lengths),
    "curves": (task_curves, plot_curves),
}


def settings_line(args):
    """One line: which settings run, and how to get the others."""
    shown = ", ".join(f"{k} {v}" for k, v in (PAPER if args.profile == "paper" else SMALL).items())
    if args.profile == "paper":
        return f"settings: the paper's ({shown})"
    why = "--quick" if args.quick else "no GPU"
    return f"settings: small, for a CPU ({why}: {shown}); the paper's: --full"


def main(argv=None):
    """The command line: a Problem anywhere ends it with one line, `error: ...`, and exit status 1."""
    if ranks.under_torchrun():
        return main_torchrun(argv)
    try:
        run_tasks(parse_args(argv))
    except Problem as e:
        raise SystemExit(f"error: {e}") from None


def main_torchrun(argv):
    """Under torchrun: the tasks with their work shared over the ranks (see spread), as train.py runs a job: the
    options and inputs checked on every rank and agreed before any work, so that a rank missing an input stops the
    job with its line; a problem on any rank is one line from it (`rank R (HOST): ` first) and ends the job; a
    rank that dies or stops ends the others within --timeout, naming it."""
    watchdog = None
    try:
        try:
            args, problem = parse_args(argv), None
        except Problem as e:
            args, problem = argparse.Namespace(timeout=TIMEOUT, device="cpu"), str(e)
        rank, world = ranks.torchrun_place()
        device = ranks.start(args.timeout)
        if rank:  # rank 0 alone prints: tables, progress and notes
            sys.stdout = open(os.devnull, "w")
        ranks.stop_if_any(problem)
        if device.type == "cuda" and args.device.startswith("cuda"):
            args.device = str(device)
        if world > 1:
            watchdog = Progress.watchdog = ranks.Watchdog(rank, world, args.timeout, others=True)
        run_tasks(args)
        if watchdog:
            watchdog.barrier("done")  # rank 0 may still be writing
            watchdog.close()
        ranks.end()
    except Problem as e:
        ranks.exit_with(str(e))
    except RuntimeError as e:
        if not (what := ranks.collective_failure(e)):
            raise
        if watchdog:
            watchdog.fail(what, stalled=False)
        ranks.exit_with(what)
    finally:  # a bug's traceback: the monitor thread must not be inside a store call as the interpreter exits
        if watchdog:
            watchdog.close()


def parse_args(argv):
    """The options, checked, with the settings of the profile (the paper's or the small one) filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}, all")
    p.add_argument("--model", nargs="+", help=f"model directories, checkpoints or run directories (default {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", nargs="+", help="sentencepiece .model or a transformers tokenizer directory: one "
                   "for all models or one per model (default: the model's own, else data/demo/tokenizer.model)")
    p.add_argument("--data", help="the task's data set (published layout); default: the demo set")
    p.add_argument("--jcola_data", help="jglue: root of a JCoLA checkout (default data/demo/JCoLA)")
    p.add_argument("--jglue_version", help="jglue: JGLUE version to read, e.g. v1.1 (default: the newest present)")
    p.add_argument("--wiki", help="alignment, simdist: Wikipedia jsonl for random pairs, as the paper (default: "
                   "a query and a passage of two different items of the positive set)")
    p.add_argument("--run", nargs="+", help="curves: run directories or metrics.jsonl files, stage 1 first")
    p.add_argument("--out", default="out/eval", help="where TASK.json (and TASK.png) go")
    p.add_argument("--plot", action="store_true", help="draw the paper's figure (needs matplotlib)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=None, help="write OUT/report.md: the "
                   "paper's published numbers beside this run's, and what makes them not comparable (default with "
                   "--task all)")
    p.add_argument("--full", action="store_true", help="the paper's settings even without a GPU: "
                   + ", ".join(f"{k} {v}" for k, v in PAPER.items()))
    p.add_argument("--quick", action="store_true", help="the small settings even on a GPU: "
                   + ", ".join(f"{k} {v}" for k, v in SMALL.items()) + " (options given explicitly win)")
    p.add_argument("--limit", type=int, help="read at most this many records of each data file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (autocast); auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--max_len", type=int, help="truncation in tokens (default: the model's maximum length for "
                   "embeddings, 512 for fine-tuning and mlm, as the paper)")
    p.add_argument("--token_budget", type=int, default=16384, help="tokens per packed forward (ppl, mlm, embeddings)")
    p.add_argument("--mlm_probability", type=float, default=0.3)
    p.add_argument("--bins", default="0,1024,2048,4096,8192", help="ppl, lengths: length bin edges")
    p.add_argument("--docs_per_bin", type=int, help="ppl, lengths: documents per length bin")
    p.add_argument("--positions", type=int, help="ppl: masked copies per document")
    p.add_argument("--topk", type=int, default=5, help="fillmask: predictions kept in the report")
    p.add_argument("--mask_input", default="hf", choices=tuple(MASK_INPUTS), help="fillmask, with a sentencepiece "
                   "tokenizer: " + "; ".join(f"{k} = {v}" for k, v in MASK_INPUTS.items()) + ". Default hf: the "
                   "input Table 3's numbers came from (a transformers tokenizer always places its own mask string)")
    p.add_argument("--baselines", default="char,word", help="retrieval: units of the edit-distance and Jaccard "
                   "baselines, char and/or word (defined at the top of --help), or none")
    p.add_argument("--pairs", type=int, help="alignment, simdist: positive and random pairs")
    p.add_argument("--measure", default="distance", choices=tuple(MEASURES), help="simdist: the figure's measure "
                   "(both are in the report): " + ", ".join(f"{k} = {v}" for k, v in MEASURES.items()))
    p.add_argument("--hist_bins", type=int, default=40, help="lengths: histogram bins")
    p.add_argument("--tasks", default="jsts,jnli,jcola", help="jglue: which tasks")
    p.add_argument("--grid", choices=tuple(GRIDS), help="jglue: " + "; ".join(f"{k} = {v}" for k, v in GRIDS.items()))
    p.add_argument("--lrs", type=float, nargs="+", help="jglue: learning rates")
    p.add_argument("--epochs", type=int, nargs="+", help="jglue: epoch counts")
    p.add_argument("--jglue_batch_size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="under torchrun: seconds a rank waits for one "
                   "that has died or stopped before the job ends, naming it")
    args = p.parse_args(argv)
    if args.task not in tuple(TASKS) + ("all",):
        raise Problem(f"--task {args.task}: unknown task; choose from {', '.join(TASKS)}, all")
    if args.full and args.quick:
        raise Problem("--full and --quick: choose one")
    args.profile = "paper" if args.full or (args.device.startswith("cuda") and not args.quick) else "small"
    for key, value in (PAPER if args.profile == "paper" else SMALL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.baselines = [] if args.baselines == "none" else [u.strip() for u in args.baselines.split(",")]
    if not set(args.baselines) <= set(UNITS):
        raise Problem("--baselines: expected char, word, both separated by a comma, or none")
    if args.task == "all" and args.data:
        raise Problem("--data names one task's data set; with --task all every task reads its demo set")
    if min(args.epochs) < 1 or args.limit is not None and args.limit < 1 or args.timeout <= 0:
        raise Problem("--epochs, --limit and --timeout must be positive")
    return args


def run_tasks(args):
    """Every task asked for, each printing its table and writing OUT/TASK.json; with --task all, the summary."""
    if args.device == "cpu":
        cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    tasks = list(TASKS) if args.task == "all" else [args.task]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no figures (pip install matplotlib)\n")
            args.plot = False
    print(settings_line(args) + "\n", flush=True)
    tables = {}
    if not dist.is_initialized():
        entries = [] if tasks == ["curves"] else load_entries(args)
    else:  # every rank has its inputs, or none starts
        try:
            entries = [] if tasks == ["curves"] else load_entries(args)
            problem = missing_input(args, tasks)
        except Problem as e:
            entries, problem = [], str(e)
        ranks.stop_if_any(problem)
    for task in tasks:
        if task == "curves" and args.task == "all" and not args.run and not any(
                (f / "metrics.jsonl").is_file() for f in run_dirs(args)):
            print("curves: no metrics.jsonl beside the models (give the training runs with --run); skipped\n")
            continue
        with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.dtype == "bfloat16"):
            tables[task] = run_task(task, args, entries)
    if (args.task == "all" or args.report) and not ranks.rank():
        summarize(args, entries, tables)


def missing_input(args, tasks):
    """The first input of the tasks asked for that is missing here (a line), or None: checked before any work, so
    that under torchrun a node that lacks one stops the job at once. The models were loaded already."""
    own = {"mlm": DEMO / "shards", "ppl": DEMO / "wiki.jsonl", "lengths": DEMO / "wiki.jsonl",
           "retrieval": DEMO / "miracl.jsonl", "alignment": DEMO / "miracl.jsonl", "simdist": DEMO / "miracl.jsonl"}
    for task in tasks:
        if task in own and not Path(args.data or own[task]).exists():
            return f"{task}: {args.data or own[task]}: no such file" + ("" if args.data else " (the demo set)")
        if task in ("alignment", "simdist") and args.wiki and not Path(args.wiki).is_file():
            return f"--wiki {args.wiki}: no such file"
        if task == "fillmask" and args.data and not Path(args.data).is_file():
            return f"fillmask: {args.data}: no such file"
        if task == "jglue":
            for t in [t.strip().lower() for t in args.tasks.split(",")]:
                if t in JGLUE:
                    jglue_files(t, args.data or DEMO / "JGLUE", args.jcola_data or DEMO / "JCoLA", args.jglue_version)
        if task == "curves" and args.run:
            metric_files(args)
    return None


def summarize(args, entries, tables):
    """OUT/summary.json and one table of every task's rows; with --report (the default of --task all),
    OUT/report.md and its content in summary.json too."""
    columns = [e.name for e in entries]
    rows = [(f"{task}: {label}", cells + [""] * (len(columns) - len(cells)))
            for task, (_, task_rows) in tables.items() for label, cells in task_rows]
    path = Path(args.out) / "summary.json"
    content = build_report(args.out, tables) if args.report is not False else None
    write_json(path, {"profile": args.profile, "models": columns,
                      "tasks": {task: {"columns": c, "rows": [[label, cells] for label, cells in r]}
                                for task, (c, r) in tables.items()},
                      **({"report": content} if content is not None else {})})
    print_table("summary", columns, rows)
    print(f"wrote {path}")
    if content is not None:
        print(f"wrote {write_report(args.out, content)}")


if __name__ == "__main__":
    main()
