"""
Evaluate encoders: every analysis of the paper (SPEC §4) in one script, on the data sets' published layouts.

    python evaluate.py --task ppl                  # pseudo-perplexity vs length of the latest demo run
    python evaluate.py --task all --plot           # every task on the demo sets, with the paper's figures
    python evaluate.py --task all --plot --quick   # the same with small settings: minutes on a CPU
    python evaluate.py --task retrieval --model out/stage1/ckpt_100000 out/stage2/hf --data miracl-ja-train.jsonl
    python evaluate.py --task jglue --model path/to/llm-jp-modernbert-base --tokenizer llm-jp.model \\
        --data path/to/JGLUE --jcola_data path/to/JCoLA --lrs 2e-5 5e-5 --epochs 1 2 3

Tasks: mlm, ppl, fillmask, retrieval, jglue, alignment, simdist, lengths, curves, all.
--model takes Hugging Face ModernBERT directories, our checkpoints (RUN/ckpt_STEP) or run directories (their
final hf/ export, else their newest checkpoint); several are compared side by side. Default: out/demo/hf.
--data takes the task's data set in its published layout; without it, the demo sets in data/demo/.
Each task writes OUT/TASK.json (its numbers and the settings that produced them) and prints a table; --plot
also draws OUT/TASK.png where the paper has a figure (ppl, lengths, alignment, simdist, curves; needs matplotlib).
"""
import argparse
import bisect
import json
import math
import random
import re
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
from data import DataError, Shards, Tokenizer, mask_tokens, read_jsonl
from model import ModernBERT, ModernBertConfig, ModernBertForSequenceClassification

TASKS = ("mlm", "ppl", "fillmask", "retrieval", "jglue", "alignment", "simdist", "lengths", "curves")
DEMO = Path("data/demo")
DEFAULT_MODEL = "out/demo/hf"
# the paper's settings (SPEC §4), and --quick's for a run of minutes on a CPU
PAPER = dict(docs_per_bin=500, positions=100, pairs=2000, lrs=[5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 1e-4],
             epochs=[1, 2, 3, 4, 5, 10], limit=None)
QUICK = dict(docs_per_bin=2, positions=10, pairs=200, lrs=[1e-4], epochs=[1, 2], limit=200)
IGNORE_INDEX = -100

# the paper's fill-mask prompts (SPEC §4); "{}" marks the masked token
PAPER_PROMPTS = ["{}は、地球上で最も高い山として知られています。", "1年は{}ヶ月です。", "1年はおよそ{}日です。",
                 "英語で「ありがとう」は{}と言います。", "最も長い川は{}です。"]


def fail(message):
    """Stop with one line for people and a non-zero exit."""
    raise SystemExit(f"error: {message}")


def progress(iterable, desc, total=None):
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)


# -----------------------------------------------------------------------------------------------------------
# models and tokenizers


def find_weights(path):
    """--model PATH -> ("hf", dir) for a Hugging Face directory (config.json) or ("ckpt", dir) for one of our
    training checkpoints (meta.json). A run directory stands for its final export hf/, else its newest ckpt_STEP."""
    try:
        return checkpoint.resolve(path)
    except checkpoint.CheckpointError as e:
        fail(f"--model {e}" + (" (run `python train.py configs/demo.py` first to make the demo model)"
                               if str(path) == str(DEFAULT_MODEL) else ""))


def load_model(path, device):
    """-> (ModernBERT in eval mode, the tokenizer file that belongs to it or None)."""
    find_weights(path)  # the path's errors worded for --model
    try:
        model, tokenizer = checkpoint.load_model(path)
    except checkpoint.CheckpointError as e:
        fail(f"--model {path}: {e}")
    return model.to(device).eval(), (tokenizer if tokenizer.is_file() else None)


def load_tokenizer(path, model, model_path):
    """The sentencepiece tokenizer, checked against the model's vocabulary and special ids."""
    if not Path(path).is_file():
        fail(f"tokenizer {path}: no such file (give --tokenizer X.model)")
    tok = Tokenizer(str(path))
    c = model.config
    if tok.vocab_size > c.vocab_size:
        fail(f"tokenizer {path} has {tok.vocab_size} pieces but model {model_path} only {c.vocab_size} embeddings")
    for name, mine, theirs in (("mask", tok.mask_id, c.mask_token_id), ("pad", tok.pad_id, c.pad_token_id),
                               ("cls", tok.cls_id, c.cls_token_id), ("sep", tok.sep_id, c.sep_token_id)):
        if mine != theirs:
            fail(f"tokenizer {path} has {name} id {mine} but model {model_path} expects {theirs}: wrong tokenizer?")
    return tok


class Entry:
    """One model under evaluation: its name (the --model argument), the model and its tokenizer."""

    def __init__(self, name, model, tokenizer, tokenizer_path):
        self.name, self.model, self.tok, self.tok_path = name, model, tokenizer, str(tokenizer_path)


def load_entries(args):
    paths = args.model or [DEFAULT_MODEL]
    toks = args.tokenizer or [None]
    if len(toks) not in (1, len(paths)):
        fail(f"--tokenizer: give one tokenizer for all models or one per model ({len(paths)}), not {len(toks)}")
    entries = []
    for i, path in enumerate(paths):
        model, own = load_model(path, args.device)
        tok_path = toks[i if len(toks) > 1 else 0] or own or DEMO / "tokenizer.model"
        entries.append(Entry(path, model, load_tokenizer(tok_path, model, path), tok_path))
    return entries


def device_of(model):
    return next(model.parameters()).device


def by_budget(lengths, token_budget):
    """Consecutive groups of item indices, each at most token_budget tokens (a longer item goes alone)."""
    batch, tokens = [], 0
    for i, n in enumerate(lengths):
        if batch and tokens + n > token_budget:
            yield batch
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        yield batch


def pack(seqs, device):
    """List of 1-D id tensors -> (input_ids (total,), cu_seqlens int32 (n+1,), max_seqlen) on device."""
    lengths = torch.tensor([len(s) for s in seqs])
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    return torch.cat(list(seqs)).to(device), cu, int(lengths.max())


# -----------------------------------------------------------------------------------------------------------
# data sets in their published layouts


def records(path, limit=None):
    """(line number, record) of a jsonl file, at most `limit` records; malformed lines stop with file:line."""
    if not Path(path).is_file():
        fail(f"{path}: no such file")
    for n, (lineno, record) in enumerate(read_jsonl(path)):
        if limit is not None and n >= limit:
            return
        yield lineno, record


def field(record, key, path, lineno, kind=str):
    """record[key], which must be of `kind`; otherwise one line naming file:line."""
    if not isinstance(record, dict) or key not in record:
        fail(f"{path}:{lineno}: record has no field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        fail(f"{path}:{lineno}: field {key!r} is {type(value).__name__}, expected "
             + " or ".join(k.__name__ for k in kinds))
    return value


def read_miracl_pairs(path, limit=None):
    """(query, passage) pairs of a MIRACL-layout jsonl (SPEC §4): every item with >= 2 positive passages gives
    query = positive_passages[0].text, passage = positive_passages[1].text. `limit` counts items read."""
    pairs = []
    for lineno, item in records(path, limit):
        positives = field(item, "positive_passages", path, lineno, list)
        if len(positives) >= 2:
            for p in positives[:2]:
                field(p, "text", path, lineno)
            pairs.append((positives[0]["text"], positives[1]["text"]))
    if not pairs:
        fail(f"{path}: no item with two or more positive_passages")
    return pairs


def read_texts(path, limit=None):
    """[(id, text)] of a Wikipedia-style jsonl ({"text", optional "id"})."""
    texts = [(lineno, r, field(r, "text", path, lineno)) for lineno, r in records(path, limit)]
    return [(str(r.get("id", f"line {lineno}")), text) for lineno, r, text in texts]


def sample_by_length(tok, path, edges, per_bin, seed, limit=None):
    """Documents sampled uniformly at random within each length bin (reservoir sampling over the file).
    A document is "<CLS> text <SEP>", never truncated; its length counts the special tokens. Bins are
    (edges[i], edges[i+1]], the first including 0; documents longer than the last edge are not used.
    -> list of bins, each a list of (id, ids int64 tensor)."""
    rng = random.Random(seed)
    bins, seen = [[] for _ in edges[:-1]], [0] * (len(edges) - 1)
    for lineno, r in progress(records(path, limit), f"tokenizing {Path(path).name}"):
        ids = [tok.cls_id] + tok.encode(field(r, "text", path, lineno)) + [tok.sep_id]
        b = bisect.bisect_left(edges, len(ids)) - 1
        if not 0 <= b < len(bins):
            continue
        item = (str(r.get("id", f"line {lineno}")), torch.tensor(ids))
        seen[b] += 1
        if len(bins[b]) < per_bin:
            bins[b].append(item)
        elif (j := rng.randrange(seen[b])) < per_bin:
            bins[b][j] = item
    return bins


def parse_edges(text):
    try:
        edges = [int(x) for x in text.split(",")]
    except ValueError:
        edges = []
    if len(edges) < 2 or edges != sorted(set(edges)) or edges[0] < 0:
        fail(f"--bins {text}: expected increasing token counts separated by commas, e.g. 0,1024,2048,4096,8192")
    return edges


# -----------------------------------------------------------------------------------------------------------
# metrics (each checked against an independent computation in tests/test_evaluate.py)


def ranks_of_gold(scores):
    """scores (n_queries, n_corpus), query i's own entry is corpus i -> its 1-based rank. Ties count against
    the query (rank = 1 + entries scoring >= its own, itself excluded), so constant scores earn nothing."""
    return (scores >= scores.diagonal()[:, None]).sum(1)  # counts the own entry itself: the + 1


def recall_mrr(scores, k=10):
    """Recall@k (share of queries whose own entry is in the top k) and MRR@k (mean 1/rank, 0 outside the top k)."""
    rank = ranks_of_gold(scores).double()
    hit = rank <= k
    return hit.double().mean().item(), torch.where(hit, 1.0 / rank, 0.0).mean().item()


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
    """(n_queries, n_corpus) 1 - Levenshtein distance / length of the longer string (characters)."""
    lengths = torch.tensor([len(s) for s in corpus], dtype=torch.float64)
    rows = []
    for q in progress(queries, "edit distance"):
        d = torch.from_numpy(edit_distances(q, corpus)).double()
        rows.append(1 - d / torch.clamp(torch.maximum(lengths, torch.tensor(float(len(q)))), min=1))
    return torch.stack(rows)


def jaccard_similarity(queries, corpus):
    """(n_queries, n_corpus) Jaccard index of the strings' character sets."""
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


# -----------------------------------------------------------------------------------------------------------
# model computations


@torch.no_grad()
def embed(model, tok, texts, batch_size=32, max_len=512):
    """L2-normalised mean-pooled embeddings (n, H) of "<CLS> text <SEP>" truncated to max_len tokens."""
    device, out = device_of(model), []
    for i in progress(range(0, len(texts), batch_size), "embedding"):
        seqs = [torch.tensor(tok.encode_pair(t, max_len=max_len)) for t in texts[i:i + batch_size]]
        ids, cu, m = pack(seqs, device)
        out.append(F.normalize(model.encode(ids, cu_seqlens=cu, max_seqlen=m).float(), dim=-1).cpu())
    return torch.cat(out)


def retrieval_scores(model, tokenizer, path, limit=None, batch_size=32, max_len=512):
    """Zero-shot MIRACL-style retrieval (SPEC §4): Recall@10 and MRR@10 of each query's own passage among all
    passages, by dot product of normalised mean-pooled embeddings."""
    pairs = read_miracl_pairs(path, limit)
    q = embed(model, tokenizer, [a for a, _ in pairs], batch_size, max_len)
    c = embed(model, tokenizer, [b for _, b in pairs], batch_size, max_len)
    recall, mrr = recall_mrr(q @ c.T)
    return {"recall@10": recall, "mrr@10": mrr, "n_queries": len(pairs)}


def draw_positions(docs, special_ids, n, seed):
    """For each document, n positions drawn with replacement from its non-special positions."""
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor(sorted(special_ids))
    out = []
    for ids in docs:
        candidates = torch.nonzero(~torch.isin(ids, specials)).flatten()
        out.append(candidates[torch.randint(len(candidates), (n,), generator=g)])
    return out


@torch.no_grad()
def pseudo_perplexity(model, docs, positions, token_budget=16384, desc="pseudo-perplexity"):
    """PPL of each document (1-D id tensors with their special tokens) = exp(mean cross-entropy of the masked
    token over its copies), one copy per drawn position with that one position masked. Copies of the same
    position are identical, so each distinct copy runs once and is weighted by its count. Copies are packed
    without padding up to `token_budget` tokens per forward and only the masked tokens are decoded."""
    device, mask_id = device_of(model), model.config.mask_token_id
    copies = []  # (document, position, count)
    for d, pos in enumerate(positions):
        uniq, counts = pos.unique(return_counts=True)
        copies += [(d, p, c) for p, c in zip(uniq.tolist(), counts.tolist())]
    ce_sum = torch.zeros(len(docs), dtype=torch.float64)
    bar = progress(None, desc, total=len(copies))
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


def task_mlm(args, entries):
    """Masked-token loss and accuracy on held-out text: our shards' val split, or a jsonl of {"text"}."""
    path = Path(args.data or DEMO / "shards")
    results = {}
    for e in entries:
        if path.is_dir():  # our shards: the held-out split, documents stored without <CLS>/<SEP>
            shards = Shards(path, "val", tokenizer=e.tok)
            n = len(shards) if args.limit is None else min(args.limit, len(shards))
            seqs = [torch.tensor([e.tok.cls_id] + shards[i][:args.max_len - 2].tolist() + [e.tok.sep_id])
                    for i in range(n)]
        else:
            seqs = [torch.tensor(e.tok.encode_pair(t, max_len=args.max_len)) for _, t in read_texts(path, args.limit)]
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
            fail(f"{path}: no tokens to mask")
        results[e.name] = {"loss": loss_sum / count, "accuracy": correct / count, "masked_tokens": count,
                           "sequences": len(seqs)}
    settings = {"data": str(path), "mlm_probability": args.mlm_probability, "seed": args.seed,
                "max_len": args.max_len, "limit": args.limit, "masking": "data.mask_tokens (80/10/10), fixed seed"}
    rows = [("loss", [f"{results[e.name]['loss']:.4f}" for e in entries]),
            ("accuracy", [f"{results[e.name]['accuracy']:.4f}" for e in entries]),
            ("masked tokens", [str(results[e.name]["masked_tokens"]) for e in entries])]
    return settings, results, rows


def task_ppl(args, entries):
    """Pseudo-perplexity against sequence length (SPEC §4, NeoBERT's method)."""
    path, edges = args.data or DEMO / "wiki.jsonl", parse_edges(args.bins)
    results, samples = {}, {}
    for e in entries:
        if e.tok.sha256 not in samples:  # models sharing a tokenizer are scored on the same documents
            samples[e.tok.sha256] = sample_by_length(e.tok, path, edges, args.docs_per_bin, args.seed, args.limit)
        bins = samples[e.tok.sha256]
        docs = [ids for b in bins for _, ids in b]
        positions = draw_positions(docs, e.tok.special_ids, args.positions, args.seed)
        ppl = pseudo_perplexity(e.model, docs, positions, args.token_budget, f"ppl {e.name}")
        per_doc, i = [], 0
        for b, items in enumerate(bins):
            for doc_id, ids in items:
                per_doc.append({"id": doc_id, "bin": b, "length": len(ids), "ppl": ppl[i]})
                i += 1
        results[e.name] = {"bins": [bin_summary(edges, b, [d["ppl"] for d in per_doc if d["bin"] == b])
                                    for b in range(len(edges) - 1)], "docs": per_doc}
    settings = {"data": str(path), "bins": edges, "bin_rule": "(lo, hi], the first bin including 0; length counts "
                "<CLS> and <SEP>; longer documents are not used", "docs_per_bin": args.docs_per_bin,
                "positions": args.positions, "seed": args.seed, "limit": args.limit,
                "ppl": "exp(mean cross-entropy over the masked copies), one position masked per copy"}
    rows = []
    for b in range(len(edges) - 1):
        cells = []
        for e in entries:
            s = results[e.name]["bins"][b]
            cells.append(f"{s['mean_ppl']:.3f} (n={s['n']})" if s["n"] else "-")
        rows.append((bin_label(edges, b), cells))
    return settings, results, rows


def bin_label(edges, b):
    return f"{'[' if b == 0 else '('}{edges[b]}, {edges[b + 1]}]"


def bin_summary(edges, b, values):
    return {"range": [edges[b], edges[b + 1]], "n": len(values),
            "mean_ppl": float(np.mean(values)) if values else None,
            "median_ppl": float(np.median(values)) if values else None}


def read_prompts(path):
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.count("{}") != 1:
                fail(f"{path}:{lineno}: a prompt needs exactly one {{}} where the mask goes")
            prompts.append(line)
    if not prompts:
        fail(f"{path}: no prompts")
    return prompts


PLACEHOLDER = "\ue000"  # a private-use character: no vocabulary has it, so it never merges with its neighbours


def prompt_ids(tok, prompt):
    """<CLS> prompt <SEP> with <MASK> at "{}". The prompt is tokenized as one text with a placeholder character
    at "{}" whose pieces then become the mask, so the words around it are tokenized as in running text (no
    sentencepiece start-of-text "▁" in the middle of the sentence)."""
    ids, marker = tok.encode(prompt.replace("{}", PLACEHOLDER)), tok.encode(PLACEHOLDER)
    for m in (marker, marker[1:]):  # with and without the start-of-text "▁"
        for i in range(len(ids) - len(m) + 1):
            if ids[i:i + len(m)] == m:
                return [tok.cls_id] + ids[:i] + [tok.mask_id] + ids[i + len(m):] + [tok.sep_id]
    fail(f"prompt {prompt!r}: cannot place the mask (the tokenizer merged the placeholder)")


@torch.no_grad()
def task_fillmask(args, entries):
    """Top-k predictions for the masked token of each prompt ("{}" marks it)."""
    source = args.data or (DEMO / "fillmask.txt" if (DEMO / "fillmask.txt").is_file() else None)
    prompts = read_prompts(source) if source else PAPER_PROMPTS
    results = {}
    for e in entries:
        out = []
        for prompt in prompts:
            ids = prompt_ids(e.tok, prompt)
            at = ids.index(e.tok.mask_id)
            logits, _ = e.model(torch.tensor(ids, device=device_of(e.model)))  # (seqlen, V)
            probs = logits[at, :e.tok.vocab_size].float().softmax(-1)
            p, top = probs.topk(args.topk)
            out.append({"prompt": prompt, "top": [{"token": e.tok.decode([t]), "id": t, "prob": v}
                                                  for t, v in zip(top.tolist(), p.tolist())]})
        results[e.name] = out
    settings = {"prompts": str(source or "the paper's prompts (built in)"), "topk": args.topk}
    rows = [(p if len(p) <= 20 else p[:19] + "…",
             [" ".join(t["token"] or "∅" for t in results[e.name][i]["top"]) for e in entries])
            for i, p in enumerate(prompts)]
    return settings, results, rows


def task_retrieval(args, entries):
    """MIRACL-style zero-shot retrieval, with the edit-distance and Jaccard baselines of the paper's Table 4."""
    path = args.data or DEMO / "miracl.jsonl"
    results = {e.name: retrieval_scores(e.model, e.tok, path, args.limit, args.batch_size, args.max_len)
               for e in entries}
    baselines = {}
    if not args.no_baselines:
        pairs = read_miracl_pairs(path, args.limit)
        queries, corpus = [a for a, _ in pairs], [b for _, b in pairs]
        for name, fn in (("edit distance", edit_similarity), ("Jaccard", jaccard_similarity)):
            recall, mrr = recall_mrr(fn(queries, corpus))
            baselines[name] = {"recall@10": recall, "mrr@10": mrr, "n_queries": len(pairs)}
    settings = {"data": str(path), "limit": args.limit, "max_len": args.max_len,
                "pairs": "items with >= 2 positives: query = positive[0].text, corpus entry = positive[1].text",
                "embedding": "mean pooling, L2-normalised, dot product",
                "ties": "count against the query",
                "baselines": "characters: 1 - Levenshtein / longer length; Jaccard index of character sets"}
    results = {**results, **{f"[{k}]": v for k, v in baselines.items()}}
    names = list(results)
    rows = [(metric, [f"{results[n][metric]:.3f}" for n in names]) for metric in ("recall@10", "mrr@10")]
    rows.append(("queries", [str(results[n]["n_queries"]) for n in names]))
    return settings, results, rows


JGLUE = {  # task -> (text fields, labels; None = regression)
    "jsts": (("sentence1", "sentence2"), None),
    "jnli": (("sentence1", "sentence2"), ("entailment", "contradiction", "neutral")),
    "jcola": (("sentence",), (0, 1)),
}


def jglue_files(task, jglue_root, jcola_root):
    """(train, valid) files of a task in the JGLUE / JCoLA repositories' layout (newest version present)."""
    if task == "jcola":
        root = Path(jcola_root)
        files = [root / "data" / "jcola-v1.0" / f"in_domain_{s}-v1.0.json" for s in ("train", "valid")]
        where = "a JCoLA checkout (--jcola_data)"
    else:
        root = Path(jglue_root)
        versions = sorted(root.glob(f"datasets/{task}-v1.*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
        if not versions:
            fail(f"{root}: no datasets/{task}-v1.*/ directory (expected a JGLUE checkout as --data)")
        d = versions[-1]
        files = [d / f"{s}-{d.name.split('-')[-1]}.json" for s in ("train", "valid")]
        where = "a JGLUE checkout (--data)"
    for f in files:
        if not f.is_file():
            fail(f"{f}: missing (expected {where})")
    return files


def read_jglue(path, task, tok, max_len, limit):
    """[(ids, label)] of a JGLUE / JCoLA file: "<CLS> s1 <SEP> [s2 <SEP>]" truncated to max_len."""
    keys, labels = JGLUE[task]
    out = []
    for lineno, r in records(path, limit):
        texts = [field(r, k, path, lineno) for k in keys]
        label = field(r, "label", path, lineno, (int, float, str))
        if labels is None:
            try:
                label = float(label)
            except ValueError:
                fail(f"{path}:{lineno}: label {label!r} is not a number")
        elif label not in labels:
            fail(f"{path}:{lineno}: label {label!r} is not one of {', '.join(map(repr, labels))}")
        else:
            label = labels.index(label)
        out.append((torch.tensor(tok.encode_pair(*texts, max_len=max_len)), label))
    if not out:
        fail(f"{path}: no records")
    return out


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


MAIN_METRIC = {"jsts": "pearson", "jnli": "accuracy", "jcola": "accuracy"}


def finetune(mlm, task, train, valid, lr, epochs, batch_size, seed, desc):
    """Fine-tune a fresh classifier from the MLM weights for max(epochs) epochs with AdamW and a linear decay
    to 0 over all of them; score the validation set after each epoch in `epochs`. -> {epoch: metrics}."""
    torch.manual_seed(seed)
    labels = JGLUE[task][1]
    regression = labels is None
    clf = ModernBertForSequenceClassification.from_mlm(mlm, 1 if regression else len(labels),
                                                       pooling=mlm.config.classifier_pooling)
    optimizer = torch.optim.AdamW(clf.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * max(epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    g = torch.Generator().manual_seed(seed)
    device, scores = device_of(clf), {}
    bar = progress(None, desc, total=total)
    for epoch in range(1, max(epochs) + 1):
        clf.train()
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(train), batch_size):
            batch = [train[j] for j in order[i:i + batch_size]]
            ids, cu, m = pack([x for x, _ in batch], device)
            y = torch.tensor([y for _, y in batch], dtype=torch.float32 if regression else torch.long, device=device)
            _, loss = clf(ids, labels=y, cu_seqlens=cu, max_seqlen=m)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
        if epoch in epochs:
            scores[epoch] = jglue_metrics(task, predict(clf, valid), [y for _, y in valid])
    bar.close()
    return scores


def task_jglue(args, entries):
    """JGLUE fine-tuning (JSTS, JNLI, JCoLA) over the LR x epoch grid; best per task and the Table 2 average."""
    tasks = [t.strip().lower() for t in args.tasks.split(",")]
    for t in tasks:
        if t not in JGLUE:
            fail(f"--tasks {args.tasks}: unknown task {t!r}; known: {', '.join(JGLUE)}")
    epochs = sorted(set(args.epochs))
    files = {t: jglue_files(t, args.data or DEMO / "JGLUE", args.jcola_data or DEMO / "JCoLA") for t in tasks}
    results = {}
    for e in entries:
        res = {}
        for t in tasks:
            train, valid = (read_jglue(f, t, e.tok, args.max_len, args.limit) for f in files[t])
            grid = []
            for lr in args.lrs:
                scores = finetune(e.model, t, train, valid, lr, epochs, args.jglue_batch_size, args.seed,
                                  f"{t} lr {lr:g} {e.name}")
                grid += [{"lr": lr, "epoch": ep, **m} for ep, m in scores.items()]
            best = max(grid, key=lambda r: r[MAIN_METRIC[t]])
            res[t] = {"best": best, "grid": grid, "train": len(train), "valid": len(valid)}
        res["average"] = float(np.mean([res[t]["best"][MAIN_METRIC[t]] for t in tasks]))
        results[e.name] = res
    settings = {"tasks": tasks, "files": {t: [str(f) for f in files[t]] for t in tasks}, "lrs": args.lrs,
                "epochs": epochs, "batch_size": args.jglue_batch_size, "max_len": args.max_len, "seed": args.seed,
                "limit": args.limit, "optimizer": "AdamW betas (0.9, 0.999), eps 1e-8, no weight decay, clip 1.0",
                "schedule": f"one run per LR, linear decay to 0 over the longest epoch count ({max(epochs)}), "
                            "validation scored after each listed epoch (so shorter epoch counts see a "
                            "partly decayed rather than a fully decayed learning rate)",
                "best": "highest validation score per task: JSTS Pearson, JNLI accuracy, JCoLA accuracy",
                "average": "mean of the best JSTS Pearson, JNLI accuracy and JCoLA accuracy (Table 2)"}
    rows = []
    for t in tasks:
        for metric in (("pearson", "spearman") if t == "jsts" else ("accuracy", "mcc") if t == "jcola" else ("accuracy",)):
            rows.append((f"{t.upper()} {metric}", [f"{results[e.name][t]['best'][metric]:.1f}" for e in entries]))
        rows.append((f"{t.upper()} best lr/epoch", [f"{results[e.name][t]['best']['lr']:g}/"
                                                    f"{results[e.name][t]['best']['epoch']}" for e in entries]))
    rows.append(("average", [f"{results[e.name]['average']:.1f}" for e in entries]))
    return settings, results, rows


def pair_texts(args):
    """Positive pairs (MIRACL) and random pairs (distinct Wikipedia documents drawn at random), n of each."""
    positives = read_miracl_pairs(args.data or DEMO / "miracl.jsonl", args.limit)[:args.pairs]
    wiki = args.wiki or DEMO / "wiki.jsonl"
    texts = [t for _, t in read_texts(wiki, args.limit)]
    n = min(args.pairs, len(texts) // 2)
    if n == 0:
        fail(f"{wiki}: fewer than two documents for random pairs")
    chosen = random.Random(args.seed).sample(range(len(texts)), 2 * n)
    randoms = [(texts[chosen[i]], texts[chosen[n + i]]) for i in range(n)]
    return positives, randoms


def pair_embeddings(e, pairs, args):
    a = embed(e.model, e.tok, [x for x, _ in pairs], args.batch_size, args.max_len)
    b = embed(e.model, e.tok, [y for _, y in pairs], args.batch_size, args.max_len)
    return a, b


def task_alignment(args, entries):
    """Alignment on positive pairs and uniformity (t = 2) on random texts, f = normalised mean-pooled embedding."""
    positives, randoms = pair_texts(args)
    results = {}
    for e in entries:
        a, b = pair_embeddings(e, positives, args)
        x, y = pair_embeddings(e, randoms, args)
        results[e.name] = {"alignment": alignment(a, b), "uniformity": uniformity(torch.cat([x, y])),
                           "positive_pairs": len(positives), "random_texts": 2 * len(randoms)}
    settings = {"positives": str(args.data or DEMO / "miracl.jsonl"), "random": str(args.wiki or DEMO / "wiki.jsonl"),
                "pairs": args.pairs, "limit": args.limit, "seed": args.seed, "max_len": args.max_len, "t": 2,
                "uniformity": "over all pairs of distinct texts among the 2 x pairs random Wikipedia texts"}
    rows = [(k, [f"{results[e.name][k]:.4f}" for e in entries]) for k in ("alignment", "uniformity")]
    return settings, results, rows


def task_simdist(args, entries):
    """Cosine similarity of positive vs random pairs (histograms over [-1, 1])."""
    positives, randoms = pair_texts(args)
    edges = np.linspace(-1, 1, args.hist_bins + 1)
    results = {}
    for e in entries:
        res = {}
        for name, pairs in (("positive", positives), ("random", randoms)):
            a, b = pair_embeddings(e, pairs, args)
            cos = (a * b).sum(-1).clamp(-1, 1).numpy()
            res[name] = {"mean": float(cos.mean()), "std": float(cos.std()), "n": len(cos),
                         "counts": np.histogram(cos, edges)[0].tolist()}
        results[e.name] = {**res, "edges": edges.tolist()}
    settings = {"positives": str(args.data or DEMO / "miracl.jsonl"), "random": str(args.wiki or DEMO / "wiki.jsonl"),
                "pairs": args.pairs, "limit": args.limit, "seed": args.seed, "max_len": args.max_len}
    rows = [(f"{kind} cos {stat}", [f"{results[e.name][kind][stat]:.4f}" for e in entries])
            for kind in ("positive", "random") for stat in ("mean", "std")]
    return settings, results, rows


def task_lengths(args, entries):
    """Token-length distribution of the pseudo-perplexity sample (the same documents task ppl uses)."""
    path, edges = args.data or DEMO / "wiki.jsonl", parse_edges(args.bins)
    results, samples = {}, {}
    for e in entries:
        if e.tok.sha256 not in samples:
            bins = sample_by_length(e.tok, path, edges, args.docs_per_bin, args.seed, args.limit)
            lengths = [len(ids) for b in bins for _, ids in b]
            hist_edges = np.linspace(0, edges[-1], args.hist_bins + 1)
            samples[e.tok.sha256] = {
                "n": len(lengths), "per_bin": [len(b) for b in bins], "lengths": lengths,
                "mean": float(np.mean(lengths)) if lengths else None,
                "median": float(np.median(lengths)) if lengths else None,
                "edges": hist_edges.tolist(), "counts": np.histogram(lengths, hist_edges)[0].tolist()}
        results[e.name] = {"tokenizer": e.tok_path, "tokenizer_sha256": e.tok.sha256, **samples[e.tok.sha256]}
    settings = {"data": str(path), "bins": edges, "docs_per_bin": args.docs_per_bin, "seed": args.seed,
                "limit": args.limit}
    rows = [(bin_label(edges, b), [str(results[e.name]["per_bin"][b]) for e in entries]) for b in range(len(edges) - 1)]
    rows += [(stat, [f"{results[e.name][stat]:.0f}" if results[e.name][stat] is not None else "-" for e in entries])
             for stat in ("mean", "median")]
    return settings, results, rows


CURVES = ("loss", "val_loss", "val_acc", "recall@10", "mrr@10")


def run_dirs(args):
    """The training runs of the --model arguments: RUN for RUN/hf and RUN/ckpt_STEP, else the path itself."""
    return [Path(m).parent if Path(m).name == "hf" or re.fullmatch(r"ckpt_\d+", Path(m).name) else Path(m)
            for m in (args.model or [DEFAULT_MODEL])]


def metric_files(args):
    """metrics.jsonl files from --run (run directories or the files), else from the --model run directories."""
    files = []
    for r in args.run or run_dirs(args):
        f = Path(r) / "metrics.jsonl" if Path(r).is_dir() else Path(r)
        if not f.is_file():
            fail(f"{r}: no metrics.jsonl (give the training run directories with --run)")
        files.append(f)
    return files


def task_curves(args, entries):
    """Training curves from metrics.jsonl (Figure 1); several runs (stage 1, stage 2) are joined in order, a run
    whose steps restart at 0 continuing after the previous one's last step."""
    files = metric_files(args)
    points, starts, offset = {k: [] for k in CURVES}, [], 0
    for f in files:
        lines = list(records(f))
        rows, steps = [r for _, r in lines], [field(r, "step", f, lineno, int) for lineno, r in lines]
        shift = offset if steps and min(steps) <= offset else 0
        starts.append(shift + (min(steps) if steps else 0))
        for r, s in zip(rows, steps):
            for k in CURVES:
                if isinstance(r.get(k), (int, float)):
                    points[k].append([s + shift, r[k]])
        offset = max([offset] + [s + shift for s in steps])
    results = {"runs": [str(f) for f in files], "stage_starts": starts, "points": points}
    settings = {"runs": [str(f) for f in files], "join": "runs in the order given; a run whose steps restart "
                "continues after the previous run's last step"}
    rows = [(k, [f"{points[k][-1][1]:.4f} @ {points[k][-1][0]}" if points[k] else "-"]) for k in CURVES]
    return settings, {"curves": results}, rows


# -----------------------------------------------------------------------------------------------------------
# figures (matplotlib, optional)


def plot(task, report, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = report["results"]
    if task == "ppl":
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (name, r) in enumerate(models.items()):
            color = f"C{i}"
            ax.scatter([d["length"] for d in r["docs"]], [d["ppl"] for d in r["docs"]], s=6, alpha=0.4, color=color)
            means = [(sum(b["range"]) / 2, b["mean_ppl"]) for b in r["bins"] if b["n"]]
            if means:  # per-bin mean at the bin's centre
                ax.plot(*zip(*means), marker="o", color=color, label=name)
        ax.set(xlabel="sequence length (tokens)", ylabel="pseudo-perplexity", yscale="log")
        ax.legend()
    elif task == "lengths":
        fig, ax = plt.subplots(figsize=(8, 5))
        shown = {}  # one histogram per distinct tokenizer
        for r in models.values():
            shown.setdefault(r["tokenizer_sha256"], r)
        for r in shown.values():
            ax.hist(r["lengths"], bins=r["edges"], alpha=0.6, label=r["tokenizer"])
        ax.set(xlabel="sequence length (tokens)", ylabel="documents")
        ax.legend()
    elif task == "alignment":
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, r in models.items():
            ax.scatter(r["uniformity"], r["alignment"], s=40)
            ax.annotate(name, (r["uniformity"], r["alignment"]), fontsize=8)
        ax.set(xlabel="uniformity", ylabel="alignment")
    elif task == "simdist":
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, (name, r) in zip(axes[0], models.items()):
            for kind in ("random", "positive"):
                ax.stairs(r[kind]["counts"], r["edges"], fill=True, alpha=0.5, label=kind)
            ax.set(title=name, xlabel="cosine similarity", ylabel="pairs")
            ax.legend()
    elif task == "curves":
        r = models["curves"]
        fig, axes = plt.subplots(1, 4, figsize=(20, 4))
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
    else:
        return None
    fig.tight_layout()
    path = out / f"{task}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------------------------------------


def display_width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def print_table(task, columns, rows):
    """Rows of (label, one cell per column), aligned for a terminal (CJK characters are two columns wide)."""
    left = lambda s, w: s + " " * (w - display_width(s))
    right = lambda s, w: " " * (w - display_width(s)) + s
    width = max(display_width(label) for label, _ in [(task, None)] + rows)
    widths = [max([display_width(c)] + [display_width(cells[i]) for _, cells in rows]) for i, c in enumerate(columns)]
    print(left(task, width) + "  " + "  ".join(right(c, w) for c, w in zip(columns, widths)))
    for label, cells in rows:
        print(left(label, width) + "  " + "  ".join(right(c, w) for c, w in zip(cells, widths)))


def run_task(task, args, entries):
    t0 = time.perf_counter()
    settings, results, rows = globals()[f"task_{task}"](args, entries)
    report = {"task": task, "settings": {**settings, "quick": args.quick, "dtype": args.dtype},
              "models": [e.name for e in entries],
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.json"
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    columns = list(results) if task in ("retrieval", "curves") else [e.name for e in entries]
    print_table(task, columns if task != "curves" else ["final value @ step"], rows)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    if args.plot and (figure := plot(task, report, out)):
        print(f"wrote {figure}")
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}, all")
    p.add_argument("--model", nargs="+", help=f"model directories, checkpoints or run directories (default {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", nargs="+", help="sentencepiece .model: one for all models or one per model "
                   "(default: MODEL/tokenizer.model, else data/demo/tokenizer.model)")
    p.add_argument("--data", help="the task's data set (published layout); default: the demo set")
    p.add_argument("--jcola_data", help="jglue: root of a JCoLA checkout (default data/demo/JCoLA)")
    p.add_argument("--wiki", help="alignment, simdist: Wikipedia jsonl for random pairs (default data/demo/wiki.jsonl)")
    p.add_argument("--run", nargs="+", help="curves: run directories or metrics.jsonl files, stage 1 first")
    p.add_argument("--out", default="out/eval", help="where TASK.json (and TASK.png) go")
    p.add_argument("--plot", action="store_true", help="draw the paper's figure (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run on the CPU: "
                   + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + " (options given explicitly win)")
    p.add_argument("--limit", type=int, help="read at most this many records of each data file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (autocast)")
    p.add_argument("--max_len", type=int, default=512, help="truncation of embedded, masked and fine-tuned texts")
    p.add_argument("--batch_size", type=int, default=32, help="texts per forward when embedding")
    p.add_argument("--token_budget", type=int, default=16384, help="ppl, mlm: tokens per packed forward")
    p.add_argument("--mlm_probability", type=float, default=0.3)
    p.add_argument("--bins", default="0,1024,2048,4096,8192", help="ppl, lengths: length bin edges")
    p.add_argument("--docs_per_bin", type=int, help="ppl, lengths: documents per length bin (default 500)")
    p.add_argument("--positions", type=int, help="ppl: masked copies per document (default 100)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--no_baselines", action="store_true", help="retrieval: skip edit distance and Jaccard")
    p.add_argument("--pairs", type=int, help="alignment, simdist: positive and random pairs (default 2000)")
    p.add_argument("--hist_bins", type=int, default=40)
    p.add_argument("--tasks", default="jsts,jnli,jcola", help="jglue: which tasks")
    p.add_argument("--lrs", type=float, nargs="+", help="jglue: learning rates (default 5e-6 1e-5 2e-5 3e-5 5e-5 1e-4)")
    p.add_argument("--epochs", type=int, nargs="+", help="jglue: epoch counts scored (default 1 2 3 4 5 10)")
    p.add_argument("--jglue_batch_size", type=int, default=32)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no figures (pip install matplotlib)\n")
            args.plot = False
    if args.task not in TASKS + ("all",):
        fail(f"--task {args.task}: unknown task; choose from {', '.join(TASKS)}, all")
    if args.task == "all" and args.data:
        fail("--data names one task's data set; with --task all every task reads its demo set")
    if min(args.epochs) < 1 or args.limit is not None and args.limit < 1:
        fail("--epochs and --limit must be positive")
    try:
        entries = [] if tasks == ["curves"] else load_entries(args)
        for task in tasks:
            if task == "curves" and args.task == "all" and not args.run and not all(
                    (f / "metrics.jsonl").is_file() for f in run_dirs(args)):
                print("curves: no metrics.jsonl beside the models (give the training runs with --run); skipped\n")
                continue
            with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.dtype == "bfloat16"):
                run_task(task, args, entries)
    except DataError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
