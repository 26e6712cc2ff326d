"""evaluate.py: every metric against an independent computation (numpy, plain loops, transformers), the
published file layouts, errors for people, and every task end to end on the demo data with a tiny model."""
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import torch
import torch.nn.functional as F
import transformers  # a pinned test dependency: the independent reference

import data
from conftest import write_jsonl
from demo import write_demo
import evaluate as ev
from model import ModernBERT, ModernBertConfig
from ranks import Problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread (no thread synchronisation per small operation),
    all the more so on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    ids = dict(pad_token_id=4, cls_token_id=5, sep_token_id=6, mask_token_id=3)
    return ModernBERT(ModernBertConfig.preset("tiny", vocab_size=vocab_size, **{**ids, **kw})).eval()


DEMO_RUN = """out_dir = "out/demo"
model = "tiny"
data_dir = "data/demo/shards"
tokenizer = "data/demo/tokenizer.model"
max_seqlen = 64
batch_size = 4
micro_batch_size = 4
max_steps = 2
warmup_steps = 1
log_every = 1
checkpoint_every = 2
eval_every = 2
eval_batches = 1
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A directory laid out as a user's checkout after the demo data and a (two-step) demo training run:
    data/demo/ (demo sets, a small tokenizer, shards) and out/demo/ (train.py's ckpt_2/, hf/, metrics.jsonl)."""
    root = tmp_path_factory.mktemp("checkout")
    d = root / "data" / "demo"
    paths = write_demo(d, n_docs=400)
    tok_path = data.train_tokenizer(paths["corpus"], 1000, d / "tokenizer.model")
    data.prepare(paths["corpus"], tok_path, d / "shards", val_fraction=0.05)
    (root / "demo_run.py").write_text(DEMO_RUN)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "demo_run.py"], cwd=root, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def run_cli(root, *argv):
    """evaluate.py's main() run from `root` (so the default paths are root's data/demo and out/demo)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ev.main([str(a) for a in argv])
    finally:
        os.chdir(cwd)


def report(root, task, out="out/eval"):
    return json.loads((root / out / f"{task}.json").read_text())

# -----------------------------------------------------------------------------------------------------------
# metrics against independent computations


def test_recall_mrr_on_a_hand_made_ranking():
    gold_ranks = [1, 2, 3, 10, 11, 12, 1, 5, 7, 4, 12, 9]
    n = len(gold_ranks)
    scores = torch.full((n, n), 0.1, dtype=torch.float64)
    for i, r in enumerate(gold_ranks):
        scores[i, i] = 0.5
        others = [j for j in range(n) if j != i]
        scores[i, others[:r - 1]] = 0.9  # r - 1 entries above the gold one
    recall, mrr = ev.recall_mrr(scores)
    assert recall == pytest.approx(sum(r <= 10 for r in gold_ranks) / n)
    assert mrr == pytest.approx(sum(1 / r for r in gold_ranks if r <= 10) / n)
    # ties count against the query: constant scores put every gold entry last
    assert ev.recall_mrr(torch.zeros(n, n)) == (0.0, 0.0)


def test_pearson_spearman_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    assert ev.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # no ties in continuous data
    assert ev.spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], abs=1e-12)
    assert ev.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert ev.average_ranks([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_jglue_scores_are_table_2s_percentages():
    """JSTS Pearson and Spearman, JNLI accuracy, JCoLA accuracy and MCC, each x 100, against numpy."""
    rng = np.random.default_rng(2)
    gold = rng.uniform(0, 5, 40)
    pred = gold ** 2 + rng.normal(size=40)  # monotone but not linear: Pearson and Spearman differ
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    assert ev.jglue_metrics("jsts", pred, gold) == {"pearson": pytest.approx(100 * np.corrcoef(pred, gold)[0, 1]),
                                                    "spearman": pytest.approx(100 * np.corrcoef(ranks(pred), ranks(gold))[0, 1])}
    labels = rng.integers(0, 3, 50)
    guess = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 3, 50))
    assert ev.jglue_metrics("jnli", guess.tolist(), labels.tolist()) == {"accuracy": pytest.approx(100 * np.mean(guess == labels))}
    labels, guess = labels % 2, guess % 2
    assert ev.jglue_metrics("jcola", guess.tolist(), labels.tolist()) == {
        "accuracy": pytest.approx(100 * np.mean(guess == labels)), "mcc": pytest.approx(100 * np.corrcoef(guess, labels)[0, 1])}


def test_mcc_is_the_phi_coefficient():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    assert ev.mcc(pred, gold) == pytest.approx(np.corrcoef(pred, gold)[0, 1], abs=1e-12)
    assert ev.mcc(gold, gold) == pytest.approx(1.0)
    assert ev.mcc(np.ones(10), gold[:10]) == 0.0  # constant predictions: defined as 0


def test_alignment_and_uniformity_against_the_formula():
    g = torch.Generator().manual_seed(0)
    x, y = (F.normalize(torch.randn(20, 8, generator=g), dim=-1) for _ in range(2))
    expected_align = sum(float(((x[i] - y[i]) ** 2).sum()) for i in range(20)) / 20
    z = torch.cat([x, y]).numpy().astype(np.float64)
    terms = [math.exp(-2 * float(((z[i] - z[j]) ** 2).sum())) for i in range(40) for j in range(40) if i != j]
    assert ev.alignment(x, y) == pytest.approx(expected_align, rel=1e-6)
    assert ev.uniformity(torch.cat([x, y])) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-6)


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_against_a_plain_dp():
    rng = random.Random(0)
    alphabet = "abcあいう日本"
    for _ in range(60):  # lengths around the 64-character word boundaries of the bit-parallel algorithm
        q = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 7, 63, 64, 65, 129])))
        corpus = ["".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 64, 90]))) for _ in range(6)]
        assert ev.edit_distances(q, corpus).tolist() == [levenshtein(q, c) for c in corpus]
    sim = ev.edit_similarity(["kitten"], ["sitting", "kitten", ""])
    assert sim.tolist() == [[pytest.approx(1 - 3 / 7), 1.0, pytest.approx(0.0)]]


def test_jaccard_against_python_sets():
    queries, corpus = ["日本の山", "abc", ""], ["山の日本", "abd", "xyz", ""]
    got = ev.jaccard_similarity(queries, corpus)
    for i, q in enumerate(queries):
        for j, c in enumerate(corpus):
            union = set(q) | set(c)
            assert got[i, j].item() == pytest.approx(len(set(q) & set(c)) / len(union) if union else 0.0)


def test_word_baselines_give_a_word_one_code_on_both_sides(tmp_path):
    """The retrieval task's word-level baselines: query i is one word, its passage "the" and that word. With one
    code per word for queries and passages together, only the gold passage shares a word with its query (edit
    similarity 1 - 1/2, Jaccard 1/2; 0 for every other passage): recall@10 = MRR@10 = 1 for both."""
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "lemon"]
    rows = [{"query_id": str(i), "query": w, "positive_passages": [{"docid": f"{i}#0", "title": "", "text": w},
                                                                   {"docid": f"{i}#1", "title": "", "text": f"the {w}"}]}
            for i, w in enumerate(words)]
    args = ev.argparse.Namespace(data=write_jsonl(tmp_path / "miracl.jsonl", rows), limit=None, baselines=["word"])
    _, results, _ = ev.task_retrieval(args, [])
    for name in ("Jaccard (word)", "edit distance (word)"):
        assert results[f"[{name}]"] == {"recall@10": 1.0, "mrr@10": 1.0, "n_queries": len(words)}, name

# -----------------------------------------------------------------------------------------------------------
# pseudo-perplexity


def known_model(log_probs, **kw):
    """A model whose prediction at every position is `log_probs`: the head's LayerNorm has weight 0, so the
    logits are the decoder bias."""
    model = tiny_model(len(log_probs), num_hidden_layers=2, **kw)
    with torch.no_grad():
        model.model.embeddings.tok_embeddings.weight.normal_()
        model.head.norm.weight.zero_()
        model.decoder.bias.copy_(log_probs)
    return model


def doc(tokens):
    return torch.tensor([5] + list(tokens) + [6])


def test_pseudo_perplexity_of_a_model_with_a_known_answer():
    V = 50
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(V, generator=g).log_softmax(-1)
    model = known_model(log_probs)
    docs = [doc(torch.randint(8, V, (n,), generator=g).tolist()) for n in (3, 40, 150, 17)] + [doc([11] * 30)]
    positions = ev.draw_positions(docs, {3, 4, 5, 6}, 100, seed=0)
    for p, d in zip(positions, docs):
        assert len(p) == 100 and 0 < p.min() and p.max() < len(d) - 1  # never <CLS> or <SEP>
    got = ev.pseudo_perplexity(model, docs, positions, 3, token_budget=600)  # several packed forwards
    expected = [math.exp(-log_probs[d[p]].double().mean().item()) for d, p in zip(docs, positions)]
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[-1] == pytest.approx(math.exp(-log_probs[11].item()), rel=1e-5)  # one repeated token: 1 / p
    uniform = ev.pseudo_perplexity(known_model(torch.full((V,), -math.log(V))), docs, positions, 3)
    assert uniform == pytest.approx([V] * len(docs), rel=1e-5)


class Recorder(torch.nn.Module):
    """A stand-in model that keeps every packed input it is given and predicts `log_probs` at each labelled
    position."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs, self.weight, self.inputs = log_probs, torch.nn.Parameter(torch.zeros(1)), []

    def forward(self, ids, labels, cu_seqlens, max_seqlen):
        self.inputs.append((ids.clone(), labels.clone(), cu_seqlens.tolist(), max_seqlen))
        return self.log_probs.expand(int((labels != -100).sum()), -1), None


def test_pseudo_perplexity_masks_one_drawn_position_per_copy():
    """What the model is given: each distinct (document, drawn position) once, that position alone masked and
    labelled with its token, the rest of the document as it is; the copies counted as often as drawn."""
    V, mask_id = 50, 3
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(V, generator=g).log_softmax(-1)
    docs = [doc(torch.randint(8, V, (n,), generator=g).tolist()) for n in (3, 40, 150, 17)]
    positions = ev.draw_positions(docs, {3, 4, 5, 6}, 30, seed=0)
    model = Recorder(log_probs)
    got = ev.pseudo_perplexity(model, docs, positions, mask_id, token_budget=300)
    seen = []
    for ids, labels, cu, m in model.inputs:
        assert cu[-1] <= 300 and m == max(np.diff(cu))
        for a, b in zip(cu[:-1], cu[1:]):
            x, y = ids[a:b], labels[a:b]
            d = [len(d) for d in docs].index(b - a)  # the documents' lengths differ
            (p,) = torch.nonzero(y != -100).flatten().tolist()
            assert torch.equal(torch.cat([x[:p], x[p + 1:]]), torch.cat([docs[d][:p], docs[d][p + 1:]]))
            assert x[p] == mask_id and y[p] == docs[d][p]
            seen.append((d, p))
    assert sorted(seen) == sorted({(d, p) for d, pos in enumerate(positions) for p in pos.tolist()})
    expected = [math.exp(-log_probs[d[p]].double().mean().item()) for d, p in zip(docs, positions)]
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def tok(demo):
    return data.Tokenizer(demo / "data" / "demo" / "tokenizer.model")


class CharTok:
    """One id per character (8 + code point mod 50) and <CLS> 5, <SEP> 6: a text of n characters is a document
    of n + 2 tokens."""
    mask_id, pad_id, cls_id, sep_id, vocab_size, sha256 = 3, 4, 5, 6, 58, "chars"
    special_ids = {3, 4, 5, 6}

    def encode(self, text):
        return [8 + ord(c) % 50 for c in text]


def test_length_bins_and_sampling(tmp_path, tok):
    texts = ["あ" * n for n in (1, 5, 30, 200, 400)]
    lengths = [len(tok.encode(t)) + 2 for t in texts]
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    edges = [0, lengths[1], lengths[3], 10 ** 6]
    bins, unmaskable = ev.sample_by_length(tok, path, edges, per_bin=10, seed=0)
    assert [sorted(i for i, _ in b) for b in bins] == [["0", "1"], ["2", "3"], ["4"]]  # (lo, hi] bins
    assert [len(x) for _, x in bins[0]] == lengths[:2] and unmaskable["per_bin"] == [0, 0, 0]
    assert sum(len(b) for b in ev.sample_by_length(tok, path, edges, per_bin=1, seed=0)[0]) == 3


def test_length_sampling_is_uniform_within_each_bin(tmp_path):
    """per_bin = 1 from a bin of three documents and a bin of two: over 300 seeds each document is the one kept
    with frequency 1/3 (1/2), within 5 binomial standard errors."""
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"id": str(n), "text": "あ" * n} for n in (1, 2, 3, 4, 5, 20)])
    n = 300
    kept = [[[i for i, _ in b] for b in ev.sample_by_length(CharTok(), path, [0, 5, 10], per_bin=1, seed=s)[0]]
            for s in range(n)]
    assert all(len(b) == 1 for bins in kept for b in bins)
    for b, ids in enumerate((["1", "2", "3"], ["4", "5"])):  # lengths 3, 4, 5 and 6, 7
        p = 1 / len(ids)
        for i in ids:
            freq = sum(bins[b] == [i] for bins in kept) / n
            assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n), (b, i, freq)


def test_length_histogram_has_hist_bins_equal_bins(tmp_path):
    """task lengths: the histogram of the sample has --hist_bins equal bins on [0, last edge of --bins], and
    counts each reported length once, as numpy's histogram does."""
    chars = [1, 3, 8, 12, 20, 27, 33, 38, 45]  # lengths 3, 5, 10, 14, 22, 29, 35, 40, 47
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"id": str(i), "text": "字" * c} for i, c in enumerate(chars)])
    args = ev.argparse.Namespace(data=path, bins="0,20,50", docs_per_bin=100, seed=0, limit=None, hist_bins=5)
    entry = ev.argparse.Namespace(name="m", tok=CharTok(), tok_path="chars")
    r = ev.task_lengths(args, [entry])[1]["m"]
    assert sorted(r["lengths"]) == [c + 2 for c in chars] and r["n"] == len(chars)
    assert r["edges"] == [0, 10, 20, 30, 40, 50]
    assert r["counts"] == [2, 2, 2, 1, 2] == np.histogram(r["lengths"], bins=5, range=(0, 50))[0].tolist()
    assert (r["mean"], r["median"]) == (pytest.approx(statistics.mean(r["lengths"])), statistics.median(r["lengths"]))


def test_bin_summary_mean_and_median():
    """A ppl bin's summary: the mean and the median of its documents' values."""
    for values in ([1.0, 2.0, 10.0], [4.0, 1.0, 9.0, 2.0]):
        assert ev.bin_summary([0, 10, 20], 1, values) == {
            "range": [10, 20], "n": len(values), "mean_ppl": pytest.approx(statistics.mean(values)),
            "median_ppl": statistics.median(values)}
    assert ev.bin_summary([0, 10], 0, [1.0, 2.0, 10.0])["median_ppl"] == 2.0
    assert ev.bin_summary([0, 10], 0, []) == {"range": [0, 10], "n": 0, "mean_ppl": None, "median_ppl": None}


def test_ppl_scores_the_bin_that_ends_at_the_models_positions(tmp_path):
    """A model of 64 positions scores every bin of --bins 0,16,64: documents of up to 64 tokens fit it."""
    chars = [5, 10, 30, 62]  # 7, 12, 32 and 64 tokens
    path = write_jsonl(tmp_path / "wiki.jsonl", [{"id": str(c), "text": "字" * c} for c in chars])
    entry = ev.EvaluatedModel("m", tiny_model(CharTok.vocab_size, num_hidden_layers=2, max_position_embeddings=64),
                     CharTok(), "chars")
    args = ev.argparse.Namespace(data=path, bins="0,16,64", docs_per_bin=2, positions=3, seed=0, limit=None,
                                 token_budget=1000)
    r = ev.task_ppl(args, [entry])[1]["m"]
    assert [b["n"] for b in r["bins"]] == [2, 2]
    assert sorted(d["length"] for d in r["docs"]) == [7, 12, 32, 64]

# -----------------------------------------------------------------------------------------------------------
# published layouts and errors for people


def test_miracl_pairs_and_retrieval_with_a_known_answer(tmp_path, tok):
    rows = [{"query_id": str(i), "query": "q", "negative_passages": [],
             "positive_passages": [{"docid": f"{i}#0", "title": "t", "text": t}, {"docid": f"{i}#1", "title": "t", "text": t}]}
            for i, t in enumerate(["日本の山", "長い川の話", "東京は首都", "月は十二ヶ月", "英語の言葉", "惑星の大きさ",
                                   "猫と犬", "琵琶湖は湖", "富士山", "信濃川", "北海道", "沖縄県"])]
    rows.insert(3, {"query_id": "x", "query": "q", "negative_passages": [],
                    "positive_passages": [{"docid": "x#0", "title": "t", "text": "ひとつだけ"}]})
    path = write_jsonl(tmp_path / "miracl.jsonl", rows)
    pairs = ev.read_miracl_pairs(path)
    assert len(pairs) == 12 and pairs[0] == ("日本の山", "日本の山")
    model = tiny_model(tok.vocab_size)
    # every query is its own passage: identical embeddings, so each gold entry ranks first
    assert ev.retrieval_scores(model, tok, path) == {"recall@10": 1.0, "mrr@10": 1.0, "n_queries": 12}


def test_miracl_pair_is_the_first_and_second_positive(tmp_path):
    """An item with three positive passages pairs the first with the second."""
    rows = [{"query_id": "1", "query": "q", "negative_passages": [],
             "positive_passages": [{"docid": f"1#{k}", "title": "t", "text": t} for k, t in enumerate("一二三")]}]
    assert ev.read_miracl_pairs(write_jsonl(tmp_path / "miracl.jsonl", rows)) == [("一", "二")]


def test_random_pairs_without_wiki_join_two_different_items(tmp_path):
    """Without --wiki a random pair is the query of one item and the passage of another: on three items (an
    item's own passage would turn up about once in three draws), over 100 seeds, never a positive pair."""
    positives = [("山", "高い山"), ("川", "長い川"), ("湖", "広い湖")]
    rows = [{"query_id": str(i), "query": q, "positive_passages": [{"docid": f"{i}#0", "title": "", "text": q},
                                                                   {"docid": f"{i}#1", "title": "", "text": c}]}
            for i, (q, c) in enumerate(positives)]
    path = write_jsonl(tmp_path / "miracl.jsonl", rows)
    item = {t: i for i, pair in enumerate(positives) for t in pair}
    for seed in range(100):
        got, randoms = ev.pair_texts(ev.argparse.Namespace(data=path, limit=None, seed=seed, wiki=None, pairs=3))
        assert got == positives and len(randoms) == 3
        assert {q for q, _ in randoms} <= {q for q, _ in positives}
        assert {c for _, c in randoms} <= {c for _, c in positives}
        assert not set(randoms) & set(positives) and all(item[q] != item[c] for q, c in randoms), seed


def write_jglue(root, jsts_label=3.2, jnli_label="neutral", n=4):
    for version in ("v1.1", "v1.3"):  # the newest version present is read
        for split in ("train", "valid"):
            write_jsonl(root / "JGLUE" / "datasets" / f"jsts-{version}" / f"{split}-{version}.json",
                        [{"sentence_pair_id": str(i), "yjcaptions_id": "x", "sentence1": "犬が走る", "sentence2": "猫が歩く",
                          "label": jsts_label if i == 1 else float(i)} for i in range(n)])
            write_jsonl(root / "JGLUE" / "datasets" / f"jnli-{version}" / f"{split}-{version}.json",
                        [{"sentence_pair_id": str(i), "yjcaptions_id": "x", "sentence1": "犬が走る", "sentence2": "動物が動く",
                          "label": jnli_label if i == 1 else ["entailment", "contradiction", "neutral"][i % 3]}
                         for i in range(n)])
    for split in ("train", "valid"):
        write_jsonl(root / "JCoLA" / "data" / "jcola-v1.0" / f"in_domain_{split}-v1.0.json",
                    [{"uid": i, "source": "x", "label": i % 2, "diacritic": "g", "sentence": "猫が鳴いた。",
                      "original": "", "translation": "", "gloss": False, "linguistic_phenomenon": {}} for i in range(n)])


class FakeTok:
    cls_id, sep_id = 5, 6

    def encode_pair(self, a, b=None, max_len=None):
        return [5] + [ord(c) % 50 + 8 for c in a] + [6] + ([ord(c) % 50 + 8 for c in b] + [6] if b else [])


def test_jglue_and_jcola_layouts(tmp_path):
    write_jglue(tmp_path)
    files = {t: ev.jglue_files(t, tmp_path / "JGLUE", tmp_path / "JCoLA") for t in ev.JGLUE}
    assert files["jsts"][0] == tmp_path / "JGLUE/datasets/jsts-v1.3/train-v1.3.json"
    assert files["jcola"][1] == tmp_path / "JCoLA/data/jcola-v1.0/in_domain_valid-v1.0.json"
    jsts = ev.read_jglue(files["jsts"][0], "jsts", FakeTok(), 512, None)
    assert [y for _, y in jsts] == [0.0, 3.2, 2.0, 3.0]
    assert jsts[0][0].tolist() == FakeTok().encode_pair("犬が走る", "猫が歩く")
    assert [y for _, y in ev.read_jglue(files["jnli"][1], "jnli", FakeTok(), 512, None)] == [0, 2, 2, 0]
    assert [y for _, y in ev.read_jglue(files["jcola"][0], "jcola", FakeTok(), 512, 3)] == [0, 1, 0]
    with pytest.raises(Problem, match=r"jsts-v1\.3/train-v1\.3\.json: missing"):
        (tmp_path / "JGLUE/datasets/jsts-v1.3/train-v1.3.json").unlink()
        ev.jglue_files("jsts", tmp_path / "JGLUE", tmp_path / "JCoLA")


@pytest.mark.parametrize("bad, where", [(dict(jnli_label="maybe"), "jnli-v1.3/train-v1.3.json:2"),
                                        (dict(jsts_label="high"), "jsts-v1.3/train-v1.3.json:2")])
def test_bad_jglue_label_names_file_and_line(tmp_path, bad, where):
    write_jglue(tmp_path, **bad)
    task = "jnli" if "jnli" in where else "jsts"
    with pytest.raises(Problem) as e:
        ev.read_jglue(ev.jglue_files(task, tmp_path / "JGLUE", None)[0], task, FakeTok(), 512, None)
    assert where in str(e.value) and "\n" not in str(e.value)


def test_malformed_record_is_one_line_with_file_and_line(tmp_path, demo):
    good = {"query_id": "1", "query": "q", "positive_passages": [{"docid": "a", "title": "", "text": "x"}] * 2}
    write_jsonl(tmp_path / "miracl.jsonl", [good, good, '{"query_id": "3", "positive_passages": [', good])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--task", "retrieval", "--model",
                        str(demo / "out/demo/hf"), "--data", "miracl.jsonl"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "miracl.jsonl:3: malformed JSON" in r.stderr
    with pytest.raises(Problem, match=r"miracl\.jsonl:2: record has no field 'positive_passages'"):
        ev.read_miracl_pairs(write_jsonl(tmp_path / "miracl.jsonl", [good, {"query": "q"}]))


def test_missing_model_and_bad_task_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--task", "ppl"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "out/demo/hf" in r.stderr and "python train.py configs/demo.py" in r.stderr
    with pytest.raises(SystemExit, match=r"^error: --task perplexity: unknown task"):
        ev.main(["--task", "perplexity"])
    with pytest.raises(Problem, match=r"^--model nowhere: no such directory$"):
        ev.find_weights("nowhere")


def test_run_directory_resolves_to_export_else_newest_checkpoint(tmp_path):
    for step in (2, 10):
        (tmp_path / f"ckpt_{step}").mkdir()
        (tmp_path / f"ckpt_{step}" / "meta.json").write_text("{}")
    (tmp_path / "ckpt_30.tmp").mkdir()  # an unfinished checkpoint
    assert ev.find_weights(tmp_path) == ("ckpt", tmp_path / "ckpt_10")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert ev.find_weights(tmp_path) == ("hf", tmp_path / "hf")
    assert ev.find_weights(tmp_path / "ckpt_2") == ("ckpt", tmp_path / "ckpt_2")


def test_curves_of_a_run_named_twice_count_it_once(demo, tmp_path):
    run_cli(demo, "--task", "curves", "--model", "out/demo/hf", "out/demo/ckpt_2", "--out", tmp_path)
    r = json.loads((tmp_path / "curves.json").read_text())["results"]["curves"]
    assert r["runs"] == [str(Path("out/demo/metrics.jsonl"))] and len(r["stage_starts"]) == 1
    assert [s for s, _ in r["points"]["loss"]] == [1, 2]


class Axes:
    """Records what a plot function draws on it."""

    def __init__(self):
        self.stairs_drawn = []

    def stairs(self, values, edges, label=None, **kwargs):
        self.stairs_drawn.append((label, list(values), list(edges)))

    def set(self, **kwargs):
        pass

    def legend(self):
        pass


def test_similarity_figure_draws_each_kinds_histogram():
    report = {m: {"distance": {"edges": [0.0, 0.5, 1.0, 1.5], "positive": {"counts": [3, 1, 0]},
                               "random": {"counts": [0, 2, 2]}}} for m in ("a", "b")}
    axes = [Axes(), Axes()]
    ev.plot_simdist(lambda rows, cols, size: (None, axes), report, ev.argparse.Namespace(measure="distance"))
    for ax in axes:
        assert sorted(ax.stairs_drawn) == [("positive", [3, 1, 0], [0.0, 0.5, 1.0, 1.5]),
                                           ("random", [0, 2, 2], [0.0, 0.5, 1.0, 1.5])]


def test_curves_join_stages(tmp_path, capsys):
    s1 = write_jsonl(tmp_path / "s1" / "metrics.jsonl", [{"step": 10, "loss": 5.0}, {"step": 100, "loss": 3.0},
                                                          {"step": 100, "val_acc": 0.4, "recall@10": 0.1, "mrr@10": 0.05}])
    write_jsonl(tmp_path / "s2" / "metrics.jsonl", [{"step": 10, "loss": 2.5}, {"step": 50, "val_acc": 0.5}])
    ev.main(["--task", "curves", "--run", str(s1.parent), str(tmp_path / "s2"), "--out", str(tmp_path / "eval")])
    r = json.loads((tmp_path / "eval" / "curves.json").read_text())["results"]["curves"]
    assert r["points"]["loss"] == [[10, 5.0], [100, 3.0], [110, 2.5]]
    assert r["points"]["val_acc"] == [[100, 0.4], [150, 0.5]]
    assert r["stage_starts"] == [10, 110]
    assert "0.5000 @ 150" in capsys.readouterr().out

# -----------------------------------------------------------------------------------------------------------
# end to end on the demo data


def test_every_task_on_the_demo_data(demo, capsys):
    run_cli(demo, "--task", "all", "--plot", "--quick", "--limit", "12", "--docs_per_bin", "2", "--positions", "5",
            "--pairs", "6", "--lrs", "1e-4", "3e-4", "--epochs", "1", "2", "--max_len", "64",
            "--bins", "0,400,1000,3000")
    out = capsys.readouterr().out
    for task in ev.TASKS:
        r = report(demo, task)
        assert r["task"] == task and r["settings"]
    try:
        import matplotlib  # noqa: F401
        assert (demo / "out/eval/ppl.png").is_file()
    except ImportError:
        assert "matplotlib is not installed" in out
    assert report(demo, "mlm")["results"]["out/demo/hf"]["masked_tokens"] > 0
    ppl = report(demo, "ppl")["results"]["out/demo/hf"]
    assert all(d["ppl"] > 1 for d in ppl["docs"]) and all(b["n"] <= 2 for b in ppl["bins"])
    jglue = report(demo, "jglue")["results"]["out/demo/hf"]
    for t, metric in ev.MAIN_METRIC.items():
        assert [(g["lr"], g["epochs"]) for g in jglue[t]["grid"]] == [(1e-4, 1), (1e-4, 2), (3e-4, 1), (3e-4, 2)]
        assert jglue[t]["best"][metric] == max(g[metric] for g in jglue[t]["grid"])
    assert jglue["average"] == pytest.approx(np.mean([jglue[t]["best"][m] for t, m in ev.MAIN_METRIC.items()]))
    # the table people read carries the report's best runs, as printed
    rows = dict(json.loads((demo / "out/eval/summary.json").read_text())["tasks"]["jglue"]["rows"])
    for t, metric in ev.MAIN_METRIC.items():
        best = jglue[t]["best"]
        assert rows[f"{t.upper()} {metric}"] == [f"{best[metric]:.1f}"]
        assert rows[f"{t.upper()} best lr/epochs"] == [f"{best['lr']:g}/{best['epochs']}"]
        assert re.search(rf"^jglue: {t.upper()} {metric} +{best[metric]:.1f}$", out, re.M), t
    assert rows["average"] == [f"{jglue['average']:.1f}"]
    retrieval = report(demo, "retrieval")["results"]
    assert set(retrieval) == {"out/demo/hf"} | {f"[{b} ({u})]" for b in ("edit distance", "Jaccard") for u in ("char", "word")}
    summary = json.loads((demo / "out/eval/summary.json").read_text())
    assert set(summary["tasks"]) == set(ev.TASKS) and "summary" in out
    simdist = report(demo, "simdist")["results"]["out/demo/hf"]
    cos, dist = np.array(simdist["pairs"]["positive"]["cosine"]), np.array(simdist["pairs"]["positive"]["distance"])
    assert len(cos) == 6 and np.allclose(dist, 2 - 2 * cos)
    assert sum(simdist["distance"]["random"]["counts"]) == len(simdist["pairs"]["random"]["distance"])
    assert len(report(demo, "fillmask")["results"]["out/demo/hf"][0]["top"]) == 5
    assert report(demo, "lengths")["results"]["out/demo/hf"]["n"] == len(ppl["docs"])
    curves = report(demo, "curves")["results"]["curves"]["points"]  # train.py's metrics.jsonl
    assert [s for s, _ in curves["loss"]] == [1, 2] and [s for s, _ in curves["val_acc"]] == [0, 2]
    # report.md: the paper's values as printed (PAPER_TABLES below), this run's exactly as in the task files
    md = (demo / "out/eval/report.md").read_text()
    cwd = os.getcwd()
    os.chdir(demo)  # the models' names are paths from where evaluate.py ran
    try:
        assert summary["report"] == json.loads(json.dumps(ev.build_report("out/eval", ev.TASKS)))
    finally:
        os.chdir(cwd)
    for table in ("Table 2", "Table 3", "Table 4"):
        assert f"## {table}" in md
    for table, decimals in (("Table 2", 1), ("Table 4", 3)):
        for name, values in PAPER_TABLES[table].items():
            assert f"| paper: {name} | " + " | ".join(f"{v:.{decimals}f}" for v in values) + " |" in md
    for prompt, answer in PAPER_TABLES["Table 3"].items():
        assert f"| {prompt} | {answer} | " in md
    r = retrieval["out/demo/hf"]
    assert f"| this run: out/demo/hf | {r['recall@10']!r} | {r['mrr@10']!r} |" in md
    assert f"| this run: out/demo/hf | {jglue['jsts']['best']['pearson']!r} | {jglue['jnli']['best']['accuracy']!r} | " \
           f"{jglue['jcola']['best']['accuracy']!r} | {jglue['average']!r} |" in md
    assert md.index("## Table 2") < md.index("## Table 3") < md.index("## Table 4") < md.index("## Figure 1")
    final = PAPER_TABLES["Table 2"]["llm-jp-modernbert-base, stage 2, 200k steps"]
    differences = summary["report"]["jglue"]["run"]["out/demo/hf"]["difference"]
    assert differences == pytest.approx([jglue["jsts"]["best"]["pearson"] - final[0],
                                         jglue["jnli"]["best"]["accuracy"] - final[1],
                                         jglue["jcola"]["best"]["accuracy"] - final[2], jglue["average"] - final[3]])
    edit = retrieval["[edit distance (char)]"]
    assert summary["report"]["retrieval"]["run"]["[edit distance (char)]"]["difference"] == pytest.approx(
        [edit["recall@10"] - 0.289, edit["mrr@10"] - 0.198])
    for line in ("- data: the demo's synthetic sets", "- protocol: the small settings", "- random pairs: from the "
                 "positive set", "- JGLUE version read: jsts v", "- model and step: out/demo/hf is step 2 of a "
                 "stage-1 run on the demo data"):
        assert line in md, line
    assert ("![Figure 2" in md) == (demo / "out/eval/ppl.png").is_file()


# The paper's published numbers, typed again from the paper: Table 2 (JSTS, JNLI, JCoLA, average), Table 3
# (llm-jp-modernbert-base's top-1 answers), Table 4 (Recall@10, MRR@10).
PAPER_TABLES = {
    "Table 2": {"tohoku-nlp/bert-base-japanese-v3": (92.0, 91.2, 88.0, 90.4),
                "sbintuitions/modernbert-ja-130m": (91.6, 92.7, 86.8, 90.4),
                "sbintuitions/modernbert-ja-310m": (93.2, 93.3, 88.3, 91.6),
                **{f"llm-jp-modernbert-base, stage 1, {k}k steps": v for k, v in (
                    (4, (77.7, 68.4, 83.9, 76.7)), (15, (90.5, 89.0, 84.3, 87.9)), (50, (92.1, 92.0, 86.2, 90.1)),
                    (100, (92.1, 91.8, 86.1, 90.0)), (200, (92.0, 92.7, 85.0, 89.9)),
                    (300, (92.0, 91.9, 85.2, 89.7)), (400, (92.1, 92.0, 85.5, 89.9)),
                    (500, (92.1, 92.0, 84.5, 89.5)))},
                "llm-jp-modernbert-base, stage 2, 200k steps": (91.8, 91.3, 84.4, 89.2)},
    "Table 3": {"{}は、地球上で最も高い山として知られ、世界中の登山家たちの憧れの地となっています。": "エベレスト",
                "{}は、歴史上の重要な出来事であり、多くの人々の生活や社会のあり方に大きな影響を与えました。": "COVID-19",
                "最も長い川は{}です。その流域には多くの都市や村が広がり、豊かな自然や文化が育まれています。": "長江",
                "1年は{}ヶ月です。": "12", "英語で「ありがとう」は{}と言います。": "サンキュー", "1年はおよそ{}日です。": "365"},
    "Table 4": {"cl-nagoya/ruri-large-v2": (0.987, 0.872), "tohoku-nlp/bert-base-japanese-v3": (0.740, 0.529),
                "sbintuitions/modernbert-ja-130m": (0.506, 0.334), "edit distance": (0.289, 0.198),
                "Jaccard": (0.031, 0.021)},
}


def test_published_numbers_are_the_papers():
    tables = {t["source"]: t["rows"] for t in ev.PUBLISHED.values()}
    assert tables.keys() == PAPER_TABLES.keys()
    for name, rows in PAPER_TABLES.items():
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in tables[name].items()} == rows, name


def test_report_matches_each_model_to_its_row(tmp_path):
    rows = ev.PUBLISHED["jglue"]["rows"]
    assert ev.paper_row("models/bert-base-japanese-v3", rows) == "tohoku-nlp/bert-base-japanese-v3"
    assert ev.paper_row("llm-jp-modernbert-base", rows) == "llm-jp-modernbert-base, stage 2, 200k steps"
    run = tmp_path / "stage1" / "hf"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for step, row in ((50000, "stage 1, 50k steps"), (51000, "stage 2, 200k steps")):
        (run / "training.json").write_text(json.dumps({"step": step, "config": {"max_seqlen": 1024,
                                                                                 "data_dir": "corpus/shards"}}))
        assert ev.paper_row(str(run), rows) == f"llm-jp-modernbert-base, {row}"


def test_hf_directory_and_our_checkpoint_give_the_same_numbers(demo, tmp_path):
    """The same weights as a directory saved by transformers and as train.py's own checkpoint (DCP shards)."""
    tok = demo / "data/demo/tokenizer.model"
    transformers.AutoModelForMaskedLM.from_pretrained(demo / "out/demo/hf").save_pretrained(tmp_path / "tf")
    results = {}
    for name, path in (("tf", tmp_path / "tf"), ("ours", demo / "out/demo/ckpt_2")):
        run_cli(demo, "--task", "ppl", "--model", path, "--tokenizer", tok, "--out", tmp_path / name,
                "--limit", "6", "--docs_per_bin", "2", "--positions", "4", "--bins", "0,400,1000,3000")
        run_cli(demo, "--task", "retrieval", "--model", path, "--tokenizer", tok, "--out", tmp_path / name,
                "--limit", "6", "--baselines", "none")
        results[name] = [report(tmp_path, t, name)["results"][str(path)] for t in ("ppl", "retrieval")]
    assert results["tf"] == results["ours"]


def test_fillmask_top_predictions_of_a_known_model(tmp_path, tok):
    """The top-k pieces and their probabilities among the tokenizer's pieces (a model's embedding rows past the
    vocabulary, padding, are none); a prompt of exactly the model's positions is scored, a longer one is not."""
    log_probs = torch.full((tok.vocab_size + 16,), -20.0)
    top = tok.encode("山")[-1]
    log_probs[top], log_probs[tok.sep_id], log_probs[tok.vocab_size:] = 0.0, -1.0, 5.0
    prompts = ["日本の{}です。", "{}は高い"]
    positions = max(len(ev.prompt_ids(tok, p)) for p in prompts)
    model = known_model(log_probs.log_softmax(-1), max_position_embeddings=positions)
    model.config.pad_token_id, model.config.cls_token_id = tok.pad_id, tok.cls_id
    model.config.sep_token_id, model.config.mask_token_id = tok.sep_id, tok.mask_id
    model.save_pretrained(tmp_path / "m")
    path = write_jsonl(tmp_path / "prompts.txt", prompts + ["日本の{}です。山は高い"])
    run_cli(tmp_path, "--task", "fillmask", "--model", "m", "--tokenizer", tok.path, "--data", path, "--topk", "2")
    *scored, longer = report(tmp_path, "fillmask")["results"]["m"]
    assert "not_applicable" in longer and len(scored) == 2
    for r in scored:
        assert [t["id"] for t in r["top"]] == [top, tok.sep_id]
        assert r["top"][0]["prob"] == pytest.approx(1 / (1 + math.exp(-1) + (tok.vocab_size - 2) * math.exp(-20)))


@pytest.mark.parametrize("source", ["jsonl", "shards"])
def test_mlm_matches_a_per_sequence_computation(demo, tok, source):
    """A jsonl of texts, or the val split of our shards (the default): each text or document as "<CLS> ... <SEP>"
    cut to --max_len tokens, masked as evaluate.py draws the masks (data.mask_tokens, one generator over the
    documents in order), through the model one padded sequence at a time."""
    wiki = demo / "data/demo/wiki.jsonl"
    run_cli(demo, "--task", "mlm", *(["--data", wiki] if source == "jsonl" else []), "--limit", "5", "--max_len",
            "24", "--seed", "3", "--token_budget", "50", "--out", f"out/mlm-{source}")
    got = report(demo, "mlm", f"out/mlm-{source}")["results"]["out/demo/hf"]
    if source == "jsonl":
        docs = [tok.encode(r[1]["text"]) for _, r in zip(range(5), data.read_jsonl(wiki))]
    else:
        val = data.Shards(demo / "data/demo/shards", "val")
        docs = [val[i].tolist() for i in range(5)]
    assert all(len(d) > 22 for d in docs)  # the cut makes a difference
    model = ModernBERT.from_pretrained(demo / "out/demo/hf").eval()
    g = torch.Generator().manual_seed(3)
    losses, hits = [], []
    for d in docs:
        ids = torch.tensor([tok.cls_id] + d[:22] + [tok.sep_id])
        x, y = data.mask_tokens(ids, tok.special_ids, tok.mask_id, tok.vocab_size, g, p=0.3)
        with torch.no_grad():
            logits = model(x[None])[0][0]  # (seqlen, V): every position, one padded sequence
        sel = y != -100
        losses += F.cross_entropy(logits[sel], y[sel], reduction="none").tolist()
        hits += (logits[sel].argmax(-1) == y[sel]).tolist()
    assert (got["sequences"], got["masked_tokens"]) == (5, len(losses))
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got["accuracy"] == pytest.approx(sum(hits) / len(hits))

# -----------------------------------------------------------------------------------------------------------
# against transformers, with weights and data that let a wrong computation show


def sharpen(model, factor=20.0):
    """Scale the query and key rows of every Wqkv (attention logits grow factor**2, so attention is far from
    uniform) and the attention outputs and MLM head (so what attention sees moves the logits): which keys a
    layer sees, its window, then changes the result."""
    with torch.no_grad():
        H = model.config.hidden_size
        for layer in model.model.layers:
            layer.attn.Wqkv.weight[:2 * H] *= factor
            layer.attn.Wo.weight *= factor
        model.head.dense.weight *= factor
    return model


def test_pseudo_perplexity_matches_transformers_with_sharp_attention(tmp_path):
    model = sharpen(tiny_model(120, local_attention=8, num_hidden_layers=3))  # window 4: lengths 6..9 and beyond
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(1)
    docs = [doc(torch.randint(8, 120, (n,), generator=g).tolist()) for n in (3, 4, 6, 7, 8, 37, 90)]
    positions = ev.draw_positions(docs, {3, 4, 5, 6}, 12, seed=3)
    expected = []
    with torch.no_grad():
        for d, pos in zip(docs, positions):
            ce = []
            for p in pos.tolist():  # one masked copy at a time, every position decoded
                x = d.clone()
                x[p] = 3
                ce.append(F.cross_entropy(theirs(input_ids=x[None]).logits[0, p].double(), d[p]).item())
            expected.append(math.exp(sum(ce) / len(ce)))
    got = ev.pseudo_perplexity(model, docs, positions, 3, token_budget=100)
    assert got == pytest.approx(expected, rel=1e-6)  # measured: 3.1e-7 at most
    # the same weights with every layer global: a window that is ignored would pass the check above
    glob = ModernBERT(ModernBertConfig(**{**model.config.__dict__, "global_attn_every_n_layers": 1})).eval()
    glob.load_state_dict(model.state_dict())
    wrong = ev.pseudo_perplexity(glob, docs, positions, 3, token_budget=100)
    assert max(abs(a / b - 1) for a, b in zip(wrong, expected)) > 1e-2


def reference_retrieval(encode, pairs, k=10):
    """Recall@k and MRR@k from mean-pooled embeddings computed one text at a time, ranked with numpy."""
    def emb(texts):
        z = np.stack([encode(t) for t in texts]).astype(np.float64)
        return z / np.linalg.norm(z, axis=1, keepdims=True)
    scores = emb([q for q, _ in pairs]) @ emb([c for _, c in pairs]).T
    rank = np.array([1 + sum(scores[i, j] >= scores[i, i] for j in range(len(pairs)) if j != i)
                     for i in range(len(pairs))])
    return float(np.mean(rank <= k)), float(np.mean(np.where(rank <= k, 1.0 / rank, 0.0)))


def hf_mean_pool(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0).numpy()


def test_retrieval_matches_transformers_mean_pooling(tmp_path, demo, tok):
    path = demo / "data/demo/miracl.jsonl"
    pairs = ev.read_miracl_pairs(path, 40)
    assert len({c for _, c in pairs}) == len(pairs) and all(q != c for q, c in pairs)  # distinct passages
    model = sharpen(tiny_model(tok.vocab_size, local_attention=8))
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModel.from_pretrained(tmp_path).eval()
    recall, mrr = reference_retrieval(lambda t: hf_mean_pool(theirs, tok.encode_pair(t)), pairs)
    got = ev.retrieval_scores(model, tok, path, limit=40, max_len=8192, token_budget=300)
    assert 0 < mrr < recall < 1  # recall and MRR can be told apart
    assert (got["recall@10"], got["mrr@10"]) == (pytest.approx(recall, abs=1e-12), pytest.approx(mrr, abs=1e-12))


def test_embedding_tasks_cut_at_the_models_length_against_transformers(tmp_path, demo, tok):
    """retrieval, alignment and simdist embed each text cut at the model's maximum length (640 positions here),
    on texts alike in their first 550 tokens and longer than 640: against transformers' mean pooling of the text
    cut at 640 tokens, each value, and the summaries against numpy on the per-pair values."""
    texts = [r["text"] for _, r in data.read_jsonl(demo / "data/demo/wiki.jsonl")]
    prefix = "".join(texts[20:])  # cut to about 550 tokens, by bisection
    lo, hi = 0, len(prefix)
    while hi - lo > 1:
        lo, hi = ((lo + hi) // 2, hi) if len(tok.encode(prefix[:(lo + hi) // 2])) < 550 else (lo, (lo + hi) // 2)
    prefix = prefix[:hi]
    queries = [prefix + t for t in texts[:8]]
    passages = [prefix + t[len(t) // 3:] + t[:len(t) // 3] for t in texts[:8]]
    assert all(len(tok.encode(t)) > 660 for t in queries + passages)
    rows = [{"query_id": str(i), "query": "", "positive_passages": [{"docid": f"{i}#0", "title": "", "text": q},
                                                                     {"docid": f"{i}#1", "title": "", "text": p}]}
            for i, (q, p) in enumerate(zip(queries, passages))]
    miracl = write_jsonl(tmp_path / "miracl.jsonl", rows)
    wiki = write_jsonl(tmp_path / "wiki.jsonl", [{"id": str(i), "text": prefix + t} for i, t in enumerate(texts[8:12])])
    tiny_model(tok.vocab_size, num_hidden_layers=2, max_position_embeddings=640).save_pretrained(tmp_path / "m")
    for task in ("retrieval", "alignment", "simdist"):
        run_cli(tmp_path, "--task", task, "--model", "m", "--tokenizer", tok.path, "--data", miracl, "--wiki", wiki,
                "--pairs", "8", "--baselines", "none")
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()

    def emb(texts, max_len=640):
        z = np.stack([hf_mean_pool(theirs, tok.encode_pair(t, max_len=max_len)) for t in texts]).astype(np.float64)
        return z / np.linalg.norm(z, axis=1, keepdims=True)
    q, p, w = emb(queries), emb(passages), emb([r["text"] for _, r in data.read_jsonl(wiki)])
    pairs = list(zip(queries, passages))
    recall, mrr = reference_retrieval(lambda t: emb([t])[0], pairs)
    assert (recall, mrr) != reference_retrieval(lambda t: emb([t], 512)[0], pairs)  # the cut at 512 would show
    got = report(tmp_path, "retrieval")["results"]["m"]
    assert (got["recall@10"], got["mrr@10"], got["max_len"]) == (pytest.approx(recall, abs=1e-12),
                                                                 pytest.approx(mrr, abs=1e-12), 640)
    cos = (q * p).sum(1)
    got = report(tmp_path, "alignment")["results"]["m"]
    d = ((w[:, None] - w[None]) ** 2).sum(-1)[~np.eye(4, dtype=bool)]
    assert got["alignment"] == pytest.approx(np.mean(2 - 2 * cos), rel=1e-5)
    assert got["uniformity"] == pytest.approx(np.log(np.mean(np.exp(-2 * d))), rel=1e-5)
    got = report(tmp_path, "simdist")["results"]["m"]
    assert got["pairs"]["positive"]["cosine"] == pytest.approx(cos.tolist(), abs=1e-6)
    assert sorted(got["pairs"]["random"]["cosine"]) != pytest.approx(sorted(cos.tolist()), abs=1e-3)
    for measure in ("cosine", "distance"):
        values = {kind: np.array(got["pairs"][kind][measure]) for kind in ("positive", "random")}
        edges = np.histogram_bin_edges(np.concatenate(list(values.values())), bins="auto")
        assert got[measure]["edges"] == pytest.approx(edges.tolist(), abs=1e-12)
        for kind, v in values.items():
            assert len(v) == (8 if kind == "positive" else 2)
            assert {k: got[measure][kind][k] for k in ("mean", "std", "n", "counts")} == {
                "mean": pytest.approx(v.mean(), abs=1e-12), "std": pytest.approx(v.std(), abs=1e-12), "n": len(v),
                "counts": np.histogram(v, edges)[0].tolist()}, (measure, kind)
        assert values["positive"] == pytest.approx((2 - 2 * cos if measure == "distance" else cos).tolist(), abs=1e-6)

# -----------------------------------------------------------------------------------------------------------
# bad input: one line naming file and field, non-zero exit


@pytest.mark.parametrize("label, message", [(float("nan"), "field 'label' is nan, not a finite number"),
                                            ("NaN", "field 'label' is nan, not a finite number"),
                                            ("high", "field 'label' is 'high', not a number")])
def test_bad_jsts_labels(tmp_path, label, message):
    write_jglue(tmp_path, jsts_label=label)
    with pytest.raises(Problem) as e:
        ev.read_jglue(ev.jglue_files("jsts", tmp_path / "JGLUE", None)[0], "jsts", FakeTok(), 512, None)
    assert f"jsts-v1.3/train-v1.3.json:2: {message}" in str(e.value) and "\n" not in str(e.value)


def test_empty_data_file(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    for read in (ev.read_miracl_pairs, ev.read_texts):
        with pytest.raises(Problem, match=r"empty\.jsonl: no records"):
            read(empty)


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=3), "num_attention_heads = 3 does not divide hidden_size = 128"),
    (dict(hidden_size="128"), "hidden_size = '128' is not an int"),
    (dict(num_hidden_layers=0), "num_hidden_layers = 0 must be positive")])
def test_impossible_config_is_one_line(tmp_path, change, message):
    tiny_model(60, num_hidden_layers=2).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, **change}))
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--task", "fillmask", "--model", "m"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert f"m/config.json: {message}" in r.stderr

# -----------------------------------------------------------------------------------------------------------
# the paper's protocols


def test_jglue_grid_runs(monkeypatch):
    calls = []

    def fake(mlm, task, train, valid, lr, epochs, score_at, *rest):
        calls.append((lr, epochs, sorted(score_at)))
        return {e: {"pearson": lr * e} for e in score_at}
    monkeypatch.setattr(ev, "finetune", fake)
    args = ev.argparse.Namespace(lrs=[1e-5, 2e-5], epochs=[1, 3, 2], grid="paper", jglue_batch_size=32, seed=0)
    entry = ev.argparse.Namespace(model=None, name="m")
    grid = ev.jglue_grid(args, entry, "jsts", [], [])
    assert calls == [(lr, e, [e]) for lr in (1e-5, 2e-5) for e in (1, 2, 3)]  # each run decays over its own epochs
    assert len(grid) == 6
    calls.clear()
    args.grid = "per_lr"
    assert len(ev.jglue_grid(args, entry, "jsts", [], [])) == 6 and calls == [(lr, 3, [1, 2, 3]) for lr in (1e-5, 2e-5)]


def jglue_entry():
    return ev.argparse.Namespace(model=None, name="m", tok=FakeTok(), max_len=lambda args, default=None: 512)


def test_jglue_best_is_the_top_run_of_the_grid(tmp_path, monkeypatch):
    """Per task the best run is the one with the highest main metric over the whole grid; here the first run
    (lr 1e-5, 1 epoch) scores highest."""
    def fake(mlm, task, train, valid, lr, epochs, score_at, *rest):
        return {e: dict.fromkeys(("pearson", "spearman", "accuracy", "mcc"), 1 / (lr * e)) for e in score_at}
    monkeypatch.setattr(ev, "finetune", fake)
    write_jglue(tmp_path)
    files = {t: ev.jglue_files(t, tmp_path / "JGLUE", tmp_path / "JCoLA") for t in ev.JGLUE}
    args = ev.argparse.Namespace(lrs=[1e-5, 2e-5], epochs=[1, 2], grid="paper", jglue_batch_size=32, seed=0,
                                 limit=None)
    res = ev.jglue_model(args, jglue_entry(), list(ev.JGLUE), files)
    for t, metric in ev.MAIN_METRIC.items():
        assert [(g["lr"], g["epochs"]) for g in res[t]["grid"]] == [(1e-5, 1), (1e-5, 2), (2e-5, 1), (2e-5, 2)]
        assert (res[t]["best"]["lr"], res[t]["best"]["epochs"]) == (1e-5, 1), t
        assert res[t]["best"][metric] == pytest.approx(1e5) == max(g[metric] for g in res[t]["grid"])
    assert res["average"] == pytest.approx(1e5)


def test_majority_baseline_answers_the_training_majority(tmp_path, monkeypatch):
    """JNLI's majority-label baseline always answers the most frequent training label: training mostly
    entailment, validation mostly neutral, so it scores validation's share of entailment, 1 in 4."""
    monkeypatch.setattr(ev, "finetune", lambda mlm, task, train, valid, lr, epochs, score_at, *rest:
                        {e: {"accuracy": 0.0} for e in score_at})
    d = tmp_path / "JGLUE" / "datasets" / "jnli-v1.3"
    for split, labels in (("train", ["entailment"] * 3 + ["neutral", "contradiction"]),
                          ("valid", ["neutral"] * 3 + ["entailment"])):
        write_jsonl(d / f"{split}-v1.3.json", [{"sentence_pair_id": str(i), "yjcaptions_id": "x", "sentence1": "犬が走る",
                                                "sentence2": "動物が動く", "label": y}
                                               for i, y in enumerate(labels)])
    files = {"jnli": ev.jglue_files("jnli", tmp_path / "JGLUE", None)}
    args = ev.argparse.Namespace(lrs=[1e-5], epochs=[1], grid="paper", jglue_batch_size=32, seed=0, limit=None)
    res = ev.jglue_model(args, jglue_entry(), ["jnli"], files)["jnli"]
    assert (res["train"], res["valid"]) == (5, 4)
    assert res["majority_baseline"] == {"accuracy": 25.0}


@pytest.mark.parametrize("task", ["jsts", "jnli"])
def test_finetune_follows_the_released_recipe(monkeypatch, task):
    """The optimizer as the released fine-tuning scripts set it, seen at every step: AdamW over every parameter
    of the classifier, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping, and the learning rate
    decaying linearly from its peak at the first step to 0 after the last (no warmup); ceil(n / batch) steps
    per epoch; scored after the asked epochs."""
    steps, optimizers = [], []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            optimizers.append(self)

        def step(self, closure=None):
            steps.append([(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in self.param_groups])
            return super().step(closure)

    def no_clipping(*args, **kwargs):
        raise AssertionError("fine-tuning clips gradients")
    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", no_clipping)
    g = torch.Generator().manual_seed(0)
    examples = [(doc(torch.randint(8, 60, (int(n),), generator=g).tolist()), float(i % 5) if task == "jsts" else i % 3)
                for i, n in enumerate(torch.randint(3, 20, (38,), generator=g))]
    mlm = tiny_model(60, num_hidden_layers=2)
    scores = ev.finetune(mlm, task, examples, examples[:4], lr=2e-4, epochs=2, score_at={1, 2}, batch_size=4,
                         seed=0, desc="test")
    assert sorted(scores) == [1, 2]
    total = 10 * 2  # ceil(38 / 4) batches, 2 epochs
    assert len(optimizers) == 1 and len(steps) == total
    clf_params = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    assert len(clf_params) == sum(1 for _ in ev.classifier(mlm, 1 if task == "jsts" else 3).parameters())
    for s, groups in enumerate(steps):
        assert groups == [(pytest.approx(2e-4 * (1 - s / total), rel=1e-12), 0.0, (0.9, 0.999), 1e-8)] * len(groups)


def test_finetune_shuffles_afresh_every_epoch(monkeypatch):
    """The fine-tuning order recorded over two epochs, from the texts each training forward sees: every epoch
    visits each example once, shuffled, and the second epoch is a fresh shuffle (other batches, not the first
    epoch's again, which would fit the same batches twice: a worse fine-tune); the same seed gives the same
    orders."""
    n, batch_size = 38, 4
    examples = [(doc([8 + i, 7]), i % 3) for i in range(n)]  # example i: its own first token
    index = {tuple(x.tolist()): i for i, (x, _) in enumerate(examples)}
    seen, make = [], ev.classifier

    def record(clf, args, kwargs):
        if clf.training:
            ids, cu = args[0].tolist(), kwargs["cu_seqlens"].tolist()
            seen.append([index[tuple(ids[a:b])] for a, b in zip(cu, cu[1:])])

    def recorded(*args, **kwargs):
        clf = make(*args, **kwargs)
        clf.register_forward_pre_hook(record, with_kwargs=True)
        return clf
    monkeypatch.setattr(ev, "classifier", recorded)
    mlm = tiny_model(60, num_hidden_layers=1)
    orders = []
    for _ in range(2):
        seen.clear()
        ev.finetune(mlm, "jnli", examples, examples[:4], lr=1e-4, epochs=2, score_at={2}, batch_size=batch_size,
                    seed=0, desc="test")
        per_epoch = math.ceil(n / batch_size)
        assert len(seen) == 2 * per_epoch
        epochs = [seen[:per_epoch], seen[per_epoch:]]
        for batches in epochs:
            order = [i for b in batches for i in b]
            assert sorted(order) == list(range(n)) and order != list(range(n))
        first, second = ({frozenset(b) for b in batches} for batches in epochs)
        assert len(first & second) <= 2, (epochs[0], epochs[1])  # 10 batches each: a fresh shuffle shares about none
        orders.append(seen[:])
    assert orders[0] == orders[1]


def test_fillmask_defaults_to_table_3(tmp_path, demo):
    run_cli(demo, "--task", "fillmask", "--out", tmp_path)
    prompts = [r["prompt"] for r in json.loads((tmp_path / "fillmask.json").read_text())["results"]["out/demo/hf"]]
    assert prompts[:6] == ev.PAPER_PROMPTS and len(ev.PAPER_PROMPTS) == 6
    assert "COVID" not in prompts[1] and prompts[1].startswith("{}は、歴史上の重要な出来事であり、")
    assert len(prompts) > 6  # a demo model: the demo's own prompts follow


def test_progress_prints_lines_when_not_a_terminal(capsys):
    bar = ev.Progress("embedding", total=3, every=0.0)
    for _ in range(3):
        bar.update()
    bar.close()
    assert capsys.readouterr().out.splitlines()[-1].startswith("  embedding: 3/3")

# -----------------------------------------------------------------------------------------------------------
# baseline models through transformers (built here, nothing downloaded)


def char_wordpiece_tokenizer(texts, where):
    """A BERT WordPiece tokenizer whose vocabulary is every character of `texts` (and its "##" form)."""
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    where.mkdir(parents=True, exist_ok=True)
    (where / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(str(where / "vocab.txt"), do_lower_case=False)
    tok.save_pretrained(where)
    return tok


def release_style_tokenizer(sp_model):
    """A Hugging Face tokenizer made from a sentencepiece unigram model the way llm-jp's Hugging Face release is:
    the same pieces and scores; a normalizer that starts every text segment with "▁" and writes spaces as "▁"
    (sentencepiece's own treatment of a text); the special pieces as special tokens, which cut the text into
    segments before it is normalised; "<CLS> text <SEP>". Independent of evaluate.py: the released scripts'
    input is this tokenizer given the prompt with the mask string in it."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    backend = tokenizers.Tokenizer(tokenizers.models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)],
                                                             sp.unk_id(), byte_fallback=True))
    Replace, Regex = tokenizers.normalizers.Replace, tokenizers.Regex
    backend.normalizer = tokenizers.normalizers.Sequence([Replace(Regex("^"), "▁"), Replace(Regex("\n▁"), "\n"),
                                                          Replace(" ", "▁")])
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    backend.add_special_tokens(specials)
    named = {name: next(p for p in specials if p in (f"<{name}>", f"<{name}|LLM-jp>"))
             for name in ("CLS", "SEP", "MASK", "PAD")}
    cls, sep = named["CLS"], named["SEP"]
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, sp.piece_to_id(cls)), (sep, sp.piece_to_id(sep))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token=cls, sep_token=sep, mask_token=named["MASK"], pad_token=named["PAD"],
        unk_token=sp.id_to_piece(sp.unk_id()), model_max_length=10 ** 9,
        extra_special_tokens=[p for p in specials if p not in named.values() and p != sp.id_to_piece(sp.unk_id())])


# Table 3's prompts as the released script feeds them ("hf") and as running text ("plain"), in llm-jp's pieces:
# the text after the mask begins with a word-start piece "▁" in the first, not in the second.
TABLE_3_PIECES = [
    (["<MASK>", "▁", "は、", "地球"], ["<MASK>", "は、", "地球"]),
    (["<MASK>", "▁", "は、", "歴史"], ["<MASK>", "は、", "歴史"]),
    (["▁最も", "長い", "川", "は", "<MASK>", "▁です。", "その"],
     ["▁最も", "長い", "川", "は", "<MASK>", "です。", "その"]),
    (["▁1", "年", "は", "<MASK>", "▁", "ヶ月", "です。"],
     ["▁1", "年", "は", "<MASK>", "ヶ月", "です。"]),
    (["▁英語", "で", "「", "ありがとう", "」", "は", "<MASK>", "▁と", "言", "います。"],
     ["▁英語", "で", "「", "ありがとう", "」", "は", "<MASK>", "と", "言", "います。"]),
    (["▁1", "年", "は", "およそ", "<MASK>", "▁日", "です。"],
     ["▁1", "年", "は", "およそ", "<MASK>", "日", "です。"]),
]


def test_fillmask_inputs_of_table_3_with_the_llmjp_tokenizer(llmjp_tokenizer):
    tok = data.Tokenizer(llmjp_tokenizer)
    released = release_style_tokenizer(llmjp_tokenizer)
    for prompt, (hf, plain) in zip(ev.PAPER_PROMPTS, TABLE_3_PIECES):
        got = {mode: [tok.sp.id_to_piece(i) for i in ev.prompt_ids(tok, prompt, mode)] for mode in ("hf", "plain")}
        for mode, start in (("hf", hf), ("plain", plain)):
            assert got[mode][0] == "<CLS>" and got[mode][-1] == "<SEP>" and got[mode][1:1 + len(start)] == start
        assert got["hf"][1 + len(hf):] == got["plain"][1 + len(plain):]  # the rest of the sentence alike
        # "hf" is what the released script gives the model
        assert ev.prompt_ids(tok, prompt, "hf") == released(prompt.replace("{}", released.mask_token))["input_ids"]


@pytest.fixture(scope="module")
def zoo(demo):
    """Beside the demo run (our checkpoint, a sentencepiece tokenizer), tiny random models of every other kind,
    each with its own tokenizer, as transformers saves them: a ModernBERT with a tokenizer.json (a WordPiece
    vocabulary whose special ids are not ModernBertConfig's defaults; its config.json names no mask id, as
    transformers' ModernBERT configs do not), a BERT (WordPiece vocab.txt), a RoBERTa (byte-level BPE) and a
    DeBERTa-v2 (a sentencepiece-style unigram). The last three hold 1,024 positions.
    -> {--model name: (transformers directory of the same weights, the tokenizer the released scripts use)}."""
    d, z = demo / "data/demo", demo / "zoo"
    texts = ([r["text"] for _, r in data.read_jsonl(d / "wiki.jsonl")]
             + [t for p in ev.read_miracl_pairs(d / "miracl.jsonl") for t in p]
             + [p.replace("{}", "") for p in ev.PAPER_PROMPTS])
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=1024)
    torch.manual_seed(0)
    bert_tok = char_wordpiece_tokenizer(texts, z / "bert")
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=len(bert_tok), **small)).save_pretrained(z / "bert")

    ids = dict(pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4)  # the mask at ModernBertConfig's <SEP>
    tiny_model(len(bert_tok), num_hidden_layers=2, local_attention=16, **ids).save_pretrained(z / "modernbert")
    bert_tok.save_pretrained(z / "modernbert")
    config = json.loads((z / "modernbert/config.json").read_text())
    del config["mask_token_id"]
    (z / "modernbert/config.json").write_text(json.dumps(config))

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    roberta_tok = transformers.RobertaTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>")
    roberta_tok.save_pretrained(z / "roberta")
    transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=len(roberta_tok), pad_token_id=1, bos_token_id=0, eos_token_id=2,
        **{**small, "max_position_embeddings": 1024 + 2})).save_pretrained(z / "roberta")  # positions start at 2

    # the demo sentencepiece model's pieces and scores behind DeBERTa's special tokens (training a unigram
    # vocabulary here would take a minute)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))]
    uni = tokenizers.Tokenizer(tokenizers.models.Unigram([(t, 0.0) for t in specials] + pieces, 3, byte_fallback=True))
    uni.pre_tokenizer, uni.decoder = tokenizers.pre_tokenizers.Metaspace(), tokenizers.decoders.Metaspace()
    uni.add_special_tokens(specials)
    uni.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    deberta_tok = transformers.DebertaV2TokenizerFast(tokenizer_object=uni, bos_token="[CLS]", eos_token="[SEP]",
                                                      unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                                      cls_token="[CLS]", mask_token="[MASK]")
    deberta_tok.save_pretrained(z / "deberta")
    transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        vocab_size=len(deberta_tok), pad_token_id=0, relative_attention=True, position_biased_input=False,
        pos_att_type=["p2c", "c2p"], **small)).save_pretrained(z / "deberta")

    return {"out/demo/ckpt_2": (demo / "out/demo/hf", release_style_tokenizer(d / "tokenizer.model")),
            **{f"zoo/{m}": (z / m, transformers.AutoTokenizer.from_pretrained(z / m))
               for m in ("modernbert", "bert", "roberta", "deberta")}}


def reference_ppl(model, tok, docs, n_positions, seed):
    """Pseudo-perplexity as the released script computes it: each masked copy through transformers on its own,
    every position decoded."""
    positions = ev.draw_positions(docs, set(tok.all_special_ids), n_positions, seed)
    out = []
    with torch.no_grad():
        for d, pos in zip(docs, positions):
            ce = []
            for p in pos.tolist():
                x = d.clone()
                x[p] = tok.mask_token_id
                ce.append(F.cross_entropy(model(input_ids=x[None]).logits[0, p].double(), d[p]).item())
            out.append(math.exp(sum(ce) / len(ce)))
    return out


def test_every_task_on_every_kind_of_model_side_by_side(demo, zoo, capsys):
    """One run of every task with our checkpoint, a Hugging Face ModernBERT, a BERT, a RoBERTa and a DeBERTa-v2
    in one --model list: exit 0, every model in every report, the tasks that cannot apply to a model saying so;
    then mlm, ppl, fill-mask and retrieval against transformers with the tokenizer the released scripts use."""
    names = list(zoo)
    run_cli(demo, "--task", "all", "--model", *names, "--quick", "--limit", "12", "--docs_per_bin", "2",
            "--positions", "3", "--pairs", "6", "--lrs", "1e-4", "--epochs", "1", "--bins", "0,400,1000,3000",
            "--out", "out/zoo")
    out = capsys.readouterr().out
    for task in set(ev.TASKS) - {"curves"}:
        assert list(report(demo, task, "out/zoo")["results"])[:len(names)] == names, task
    summary = json.loads((demo / "out/zoo/summary.json").read_text())
    assert summary["models"] == names and set(summary["tasks"]) == set(ev.TASKS)
    # mlm on the demo shards: only the model of the tokenizer that made them
    mlm = report(demo, "mlm", "out/zoo")["results"]
    assert mlm[names[0]]["masked_tokens"] > 0 and all("not_applicable" in mlm[n] for n in names[1:])
    assert "mlm: zoo/bert: the shards hold ids of the sentencepiece tokenizer" in out
    texts = {str(t["id"]): t["text"] for _, t in data.read_jsonl(demo / "data/demo/wiki.jsonl")}
    pairs = ev.read_miracl_pairs(demo / "data/demo/miracl.jsonl", 12)
    ppl, fill, retrieval = (report(demo, t, "out/zoo")["results"] for t in ("ppl", "fillmask", "retrieval"))
    for name, (where, tok) in zoo.items():
        theirs = transformers.AutoModelForMaskedLM.from_pretrained(where).eval()
        positions = 8192 if name in ("out/demo/ckpt_2", "zoo/modernbert") else 1024
        # ppl: a bin beyond the model's positions is not scored; the others as transformers computes them
        r = ppl[name]
        assert [b["n"] > 0 for b in r["bins"]] == [True, True, positions > 3000]
        assert r["nothing_to_mask"]["per_bin"] == [0, 0, 0]
        assert positions > 3000 or f"ppl: {name}: bins (1000, 3000] hold documents longer than its 1024" in out
        docs = [torch.tensor(tok(texts[d["id"]])["input_ids"]) for d in r["docs"]]
        assert [len(x) for x in docs] == [d["length"] for d in r["docs"]], name
        assert [d["ppl"] for d in r["docs"]] == pytest.approx(reference_ppl(theirs, tok, docs, 3, 0), rel=1e-5), name
        # fill-mask: the released script's input, top-k probabilities
        for prompt in fill[name]:
            x = tok(prompt["prompt"].replace("{}", tok.mask_token), return_tensors="pt")["input_ids"]
            assert len(prompt["input"]) == x.shape[1], name
            with torch.no_grad():
                probs = theirs(input_ids=x).logits[0, x[0].tolist().index(tok.mask_token_id)].double().softmax(-1)
            got = [t["prob"] for t in prompt["top"]]
            assert got == pytest.approx(probs.topk(5).values.tolist(), rel=1e-4, abs=1e-7), name
            assert got == pytest.approx(probs[[t["id"] for t in prompt["top"]]].tolist(), rel=1e-4, abs=1e-7), name
        # retrieval: mean pooling
        encoder = transformers.AutoModel.from_pretrained(where).eval()
        recall, mrr = reference_retrieval(
            lambda t: hf_mean_pool(encoder, tok(t, truncation=True, max_length=positions)["input_ids"]), pairs)
        assert (retrieval[name]["recall@10"], retrieval[name]["mrr@10"]) == (pytest.approx(recall, abs=1e-9),
                                                                            pytest.approx(mrr, abs=1e-9)), name
    # the embedding tasks name their random pairs; curves come from the one training run
    for task in ("alignment", "simdist"):
        assert report(demo, task, "out/zoo")["settings"]["random_pairs"]["as_paper"] is False
        assert f"{task}: random pairs are MIRACL queries" in out and "give --wiki" in out
    curves = report(demo, "curves", "out/zoo")["results"]["curves"]
    assert curves["runs"] == [str(Path("out/demo/metrics.jsonl"))]
    assert set(curves["models_without_a_run"]) == set(names[1:])
    assert "curves: zoo/bert: no metrics.jsonl in zoo/bert" in out
    assert report(demo, "fillmask", "out/zoo")["settings"]["mask_input"]["per_model"] == {n: "hf" for n in names}


def test_mlm_of_every_kind_of_model_against_transformers(demo, zoo):
    """Masked-token loss and accuracy of a jsonl, the masks drawn as evaluate.py does (data.mask_tokens, one
    generator over the documents in order), each sequence through transformers on its own."""
    names = list(zoo)
    run_cli(demo, "--task", "mlm", "--model", *names, "--data", "data/demo/wiki.jsonl", "--limit", "4",
            "--seed", "5", "--out", "out/zoo-mlm")
    got = report(demo, "mlm", "out/zoo-mlm")["results"]
    texts = [r["text"] for _, (_, r) in zip(range(4), data.read_jsonl(demo / "data/demo/wiki.jsonl"))]
    for name, (where, tok) in zoo.items():
        theirs = transformers.AutoModelForMaskedLM.from_pretrained(where).eval()
        g = torch.Generator().manual_seed(5)
        losses, hits = [], []
        for t in texts:
            ids = torch.tensor(tok(t, truncation=True, max_length=512)["input_ids"])
            x, y = data.mask_tokens(ids, set(tok.all_special_ids), tok.mask_token_id, len(tok), g, p=0.3)
            with torch.no_grad():
                logits = theirs(input_ids=x[None]).logits[0]
            sel = y != -100
            losses += F.cross_entropy(logits[sel], y[sel], reduction="none").tolist()
            hits += (logits[sel].argmax(-1) == y[sel]).tolist()
        assert got[name]["masked_tokens"] == len(losses), name
        assert got[name]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5), name
        assert got[name]["accuracy"] == pytest.approx(sum(hits) / len(hits)), name


def test_mlm_runs_on_shards_only_for_the_tokenizer_that_made_them(demo, tmp_path, capsys):
    other = data.train_tokenizer(demo / "data/demo/corpus.jsonl", 1100, tmp_path / "other.model")
    tiny_model(1100, num_hidden_layers=2).save_pretrained(tmp_path / "other")
    shutil.copyfile(other, tmp_path / "other/tokenizer.model")
    run_cli(demo, "--task", "mlm", "--model", "out/demo/hf", tmp_path / "other", "--limit", "3",
            "--out", tmp_path / "eval")
    r = report(tmp_path, "mlm", "eval")["results"]
    assert r["out/demo/hf"]["masked_tokens"] > 0 and set(r[str(tmp_path / "other")]) == {"not_applicable"}
    assert f"mlm: {tmp_path / 'other'}: tokenizer " in capsys.readouterr().out


def test_ppl_skips_documents_with_nothing_to_mask(demo, zoo, tmp_path, capsys):
    """An all-unknown document (characters outside BERT's vocabulary: every token [UNK]) and an empty one are
    skipped and counted, per model's tokenizer; the run fails, in one line, only if that leaves a bin empty."""
    texts = [r["text"] for _, (_, r) in zip(range(6), data.read_jsonl(demo / "data/demo/wiki.jsonl"))]
    rows = ([{"id": "unknown", "text": "☃ ☄ ☃☃ " * 10}, {"id": "empty", "text": ""}]
            + [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    wiki = write_jsonl(tmp_path / "wiki.jsonl", rows)
    run_cli(demo, "--task", "ppl", "--model", "out/demo/ckpt_2", "zoo/bert", "--data", wiki, "--bins", "0,1000",
            "--docs_per_bin", "3", "--positions", "2", "--out", tmp_path / "eval")
    out = capsys.readouterr().out
    r = report(tmp_path, "ppl", "eval")["results"]
    assert r["zoo/bert"]["nothing_to_mask"] == {"per_bin": [2], "ids": ["unknown", "empty"]}
    assert r["out/demo/ckpt_2"]["nothing_to_mask"] == {"per_bin": [1], "ids": ["empty"]}  # byte fallback: no <unk>
    assert all(d["id"] not in ("unknown", "empty") for d in r["zoo/bert"]["docs"]) and len(r["zoo/bert"]["docs"]) == 3
    table = [line.split()[-2:] for line in out.splitlines() if line.startswith("skipped: nothing to mask")]
    assert table == [["1", "2"]]
    only = write_jsonl(tmp_path / "only.jsonl", rows[:2] + rows[3:4])
    with pytest.raises(SystemExit) as e:
        run_cli(demo, "--task", "ppl", "--model", "zoo/bert", "--data", only, "--bins", "0,10,1000",
                "--out", tmp_path / "eval")
    # the empty document is the bin's only one (the unknown one is 42 tokens long)
    assert str(e.value).startswith(f"error: {only}: no document of [0, 10] tokens to score (tokenizer zoo/bert, "
                                   "1 with nothing to mask); give other --bins") and "\n" not in str(e.value)


def test_regression_loss_of_a_transformers_classifier(demo, zoo):
    """JSTS fine-tuning of a transformers model: the mean squared error of its one output against the labels."""
    model, _ = ev.load_model(str(demo / "zoo/bert"), "cpu")
    clf = ev.classifier(model, 1)
    ids = [torch.tensor([2, 9, 10, 3]), torch.tensor([2, 11, 3]), torch.tensor([2, 12, 13, 14, 3])]
    x, cu, m = ev.pack(ids, "cpu")
    y = torch.tensor([0.5, 3.0, -1.0])
    with torch.no_grad():
        logits, loss = clf(x, labels=y, cu_seqlens=cu, max_seqlen=m)
    assert logits.shape == (3, 1) and loss.item() == pytest.approx(((logits[:, 0] - y) ** 2).mean().item(), rel=1e-6)


def test_a_tokenizer_whose_mask_id_the_checkpoint_contradicts_is_one_line(demo, tmp_path, tok):
    model = ModernBERT.from_pretrained(demo / "out/demo/hf")
    model.config.mask_token_id = tok.pad_id
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match=rf"tokenizer .* has mask id {tok.mask_id} but model .* expects {tok.pad_id}: "
                                         "wrong tokenizer\\?$"):
        run_cli(tmp_path, "--task", "fillmask", "--model", "m", "--tokenizer", tok.path)


def test_max_len_is_capped_at_the_models_positions(demo, tmp_path):
    tiny_model(1000, num_hidden_layers=2, max_position_embeddings=96).save_pretrained(tmp_path / "m")
    run_cli(demo, "--task", "retrieval", "--model", tmp_path / "m", "--max_len", "5000", "--limit", "4",
            "--baselines", "none", "--out", tmp_path / "eval")
    assert report(tmp_path, "retrieval", "eval")["results"][str(tmp_path / "m")]["max_len"] == 96


def test_missing_transformers_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(Problem, match=r"^--model .*bert \(bert\) needs transformers \(pip install transformers\)$"):
        ev.load_model(str(tmp_path / "bert"), "cpu")


# -----------------------------------------------------------------------------------------------------------
# under torchrun: the work shared over the ranks, the numbers of one process

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, as the one-process run
SMALL_RUN = ("--quick", "--limit", "12", "--lrs", "1e-4", "3e-4", "--epochs", "1", "2", "--grid", "paper",
             "--max_len", "64", "--docs_per_bin", "2", "--positions", "5", "--pairs", "6", "--bins", "0,400,1000,3000")
SHARED = ("jglue", "ppl", "retrieval", "alignment", "simdist")  # the tasks whose work is shared over the ranks


def test_runs_are_dealt_longest_first_to_the_least_loaded_rank():
    costs = [1, 10, 3, 3, 5, 2, 10, 4]
    shares = ev.dealt(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))  # each once
    # by hand, as (item, cost) -> rank [loads]: (1, 10) -> 0 [10, 0, 0], (6, 10) -> 1 [10, 10, 0], (4, 5) -> 2,
    # (7, 4) -> 2, (2, 3) -> 2 [10, 10, 12], (3, 3) -> 0 [13, 10, 12], (5, 2) -> 1 [13, 12, 12], (0, 1) -> 1
    assert shares == [[1, 3], [0, 5, 6], [2, 4, 7]]
    assert ev.dealt([2, 2], 3) == [[0], [1], []]
    grid = ev.argparse.Namespace(lrs=[1e-5, 2e-5], epochs=[3, 1], grid="paper")
    assert ev.grid_runs(grid) == [(1e-5, 1, {1}), (1e-5, 3, {3}), (2e-5, 1, {1}), (2e-5, 3, {3})]


def evaluate_py(root, out, *launcher, args=SMALL_RUN):
    proc = subprocess.run([*launcher, str(ROOT / "evaluate.py"), "--task", "all", *args, "--out", out], cwd=root,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_process(demo):
    """Every task on the demo data in one process, out of process as a user runs it."""
    evaluate_py(demo, "eval1", sys.executable)
    return demo / "eval1"


def assert_same(got, want, rel, where=""):
    """The same JSON, numbers within `rel` (0: exactly)."""
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], rel, f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, rel, f"{where}/{i}")
    elif isinstance(want, float) and rel:
        assert got == pytest.approx(want, rel=rel, abs=0), where
    else:
        assert got == want, where


@pytest.mark.parametrize("n", [2, 3])
def test_torchrun_gives_the_numbers_of_one_process(demo, one_process, n):
    """Every fine-tuning run of the grid, run by whichever rank, scores exactly as in one process (each is seeded
    on its own), and so do the baselines' shared rows and the unshared tasks; the documents scored and the texts
    embedded in other packed batches are within 1e-6. Rank 0 alone prints, and writes the same files."""
    proc = evaluate_py(demo, f"eval{n}", sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={n}")
    assert proc.stdout.count("settings: ") == 1 and proc.stdout.count("wrote ") == len(ev.TASKS) + 2
    out = demo / f"eval{n}"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())
    for task in ev.TASKS:
        got, want = (json.loads((d / f"{task}.json").read_text()) for d in (out, one_process))
        assert_same(got, want, 0 if task not in ("ppl", "retrieval", "alignment", "simdist") else 1e-6, task)
    assert len(json.loads((out / "jglue.json").read_text())["results"]["out/demo/hf"]["jsts"]["grid"]) == 4
    assert (out / "report.md").read_text() == (one_process / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report"] == json.loads((one_process / "summary.json").read_text())["report"]


def launch_two_nodes(dirs, *args):
    """Two `torchrun --nnodes=2` launchers as two nodes run them, each in its own directory (its relative paths,
    data/demo and out/demo, are its own) and at its own address, writing to its launcher.log; -> their processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for n, d in enumerate(dirs):
        with open(d / "launcher.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                 "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--local_addr=127.0.0.{n + 1}",
                 f"--rdzv_conf=is_host={int(n == 0)}", str(ROOT / "evaluate.py"), *map(str, args)],
                cwd=d, env=ENV, stdout=log, stderr=subprocess.STDOUT))
    return procs


def node_dirs(root, demo, missing_on_node1=()):
    """Two node directories with links to the demo data and model, node 1's without `missing_on_node1`."""
    dirs = [root / "node0", root / "node1"]
    for n, d in enumerate(dirs):
        (d / "data" / "demo").mkdir(parents=True)
        (d / "out").mkdir()
        (d / "out" / "demo").symlink_to(demo / "out" / "demo")
        for item in (demo / "data" / "demo").iterdir():
            if not (n == 1 and item.name in missing_on_node1):
                (d / "data" / "demo" / item.name).symlink_to(item)
    return dirs


def errors(d):
    """The lines evaluate.py printed as errors on the node of directory d (torchrun's summary repeats them)."""
    return [line for line in (d / "launcher.log").read_text().splitlines() if line.startswith("error: ")]


def process_tree(pid):
    """pid and all its descendants."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def end(procs, limit):
    """-> (the launchers' exit codes, seconds until the last one exited); whatever is left after `limit` seconds
    is killed."""
    t0 = time.time()
    for p in procs:
        try:
            p.wait(timeout=max(1.0, limit - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            pass
    codes, took = [p.poll() for p in procs], time.time() - t0
    for p in procs:
        for pid in reversed(process_tree(p.pid)) if p.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()
    return codes, took


def test_an_input_missing_on_one_rank_is_one_line_from_it(demo, tmp_path):
    host = socket.gethostname()
    dirs = node_dirs(tmp_path, demo, missing_on_node1=("JCoLA",))
    codes, _ = end(launch_two_nodes(dirs, "--task", "jglue", *SMALL_RUN, "--timeout", "60"), 120)
    missing = ("data/demo/JCoLA/data/jcola-v1.0/in_domain_train-v1.0.json: missing (expected a JCoLA checkout "
               "(--jcola_data))")
    assert codes == [1, 1] and errors(dirs[1]) == [f"error: rank 1 ({host}): {missing}"], errors(dirs[1])
    assert errors(dirs[0]) == [f"error: rank 0 ({host}): stopped by rank 1 ({host}): {missing}"]
    assert not (dirs[0] / "out" / "eval").exists()


def test_a_rank_killed_mid_grid_ends_the_job_within_the_timeout_naming_it(demo, tmp_path):
    """Rank 1 is killed while it fine-tunes its share of the grid: rank 0, busy with its own share or waiting for
    rank 1's at the gather that follows (the line then says which), stops within --timeout of the kill with one
    line naming rank 1 and the run it was in."""
    timeout = 20
    grid = ("--quick", "--limit", "40", "--lrs", "1e-4", "2e-4", "3e-4", "4e-4", "--epochs", "1", "2", "4", "8",
            "--grid", "paper", "--max_len", "64", "--jglue_batch_size", "4")
    dirs = node_dirs(tmp_path, demo)
    procs = launch_two_nodes(dirs, "--task", "jglue", *grid, "--timeout", timeout)
    try:
        deadline = time.time() + 120
        while "settings: " not in (dirs[0] / "launcher.log").read_text():  # both ranks have started
            assert procs[0].poll() is None and time.time() < deadline, (dirs[0] / "launcher.log").read_text()
            time.sleep(0.05)
        time.sleep(8)  # the model loaded, the inputs checked: fine-tuning, for some 20 s more
        worker = next(p for p in process_tree(procs[1].pid)[1:]
                      if b"evaluate.py" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(worker, signal.SIGKILL)
    finally:
        codes, took = end(procs, 120)
    assert codes[0] == 1 and codes[1] not in (0, None) and took < timeout + 5, (codes, took)
    lines, host = errors(dirs[0]), re.escape(socket.gethostname())
    assert len(lines) == 1 and re.fullmatch(
        rf"error: rank 0 \({host}\): step \d+ \(.+\): a rank stopped( before gather \d+)?; not heard from: rank 1 "
        rf"\({host}, last heard \d+ s ago, at step \d+, j(sts|nli|cola) lr .+ epochs out/demo/hf\)", lines[0]), lines
    assert not (dirs[0] / "out" / "eval").exists()
