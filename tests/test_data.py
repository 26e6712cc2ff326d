"""data.py against independent references: sentencepiece's own encoding, zlib's CRC-32 for the split rule, plain
counting for masking statistics, an uninterrupted single-process stream for resume and world sizes."""
import ctypes
import errno
import fcntl
import gzip
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import checkpoint  # noqa: E402
from conftest import write_jsonl  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
from data import Loader, Shards, Tokenizer  # noqa: E402
from ranks import Problem  # noqa: E402


ODD_TEXTS = [" 先頭と末尾に空白 ", "改行を\n含む\n\n文書", "emoji 🗻 と記号 ∮ と珍しい漢字 鬱", "ASCII only, 123.", "タブ\tと　全角空白"]


def sp_encode(model, texts):
    return spm.SentencePieceProcessor(model_file=str(model)).encode(list(texts))


def in_val(text, fraction):
    return zlib.crc32(text.encode("utf-8")) / 2 ** 32 < fraction


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small corpus in three input formats, a tokenizer trained on it, and its shards (several per file)."""
    d = tmp_path_factory.mktemp("data")
    paths = demo.write_demo(d / "demo", n_docs=400)
    texts = [json.loads(line)["text"] for line in open(paths["corpus"], encoding="utf-8")]
    a, b = texts[:250] + ODD_TEXTS, texts[250:]
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(a)))
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n\n" for t in b))  # blank lines are skipped
    lines = [t.replace("\n", " ") for t in texts[:60]]
    (d / "c.txt").write_text("\n".join(lines) + "\n")
    inputs = [str(d / "a.jsonl"), str(d / "b.jsonl.gz"), str(d / "c.txt")]
    tok = data.train_tokenizer(inputs, 1000, d / "tok.model")
    manifest = data.prepare(inputs, tok, d / "shards", workers=2, val_fraction=0.1, chunk_bytes=60_000)
    return {"dir": d, "paths": paths, "inputs": inputs, "texts": a + b + lines, "tok": tok, "shards": d / "shards",
            "manifest": manifest}


# ----------------------------------------------------------------------------------------------------------
# tokenizer

def test_tokenizer_layout(world):
    sp = spm.SentencePieceProcessor(model_file=str(world["tok"]))
    want = ["<unk>", "<s>", "</s>", "<MASK>", "<PAD>", "<CLS>", "<SEP>", "<EOD>"] + [f"<0x{i:02X}>" for i in range(256)]
    assert [sp.id_to_piece(i) for i in range(264)] == want
    assert sp.is_unknown(0) and all(sp.is_control(i) for i in range(1, 8)) and all(sp.is_byte(i) for i in range(8, 264))
    assert sp.get_piece_size() == 1000
    tok = Tokenizer(world["tok"])
    assert (tok.unk_id, tok.mask_id, tok.pad_id, tok.cls_id, tok.sep_id, tok.eod_id) == (0, 3, 4, 5, 6, 7)
    assert tok.special_ids == set(range(8))
    for text in ODD_TEXTS:  # no normalisation: decoding gives the text back, rare characters via bytes
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_layout_matches_llm_jp(world, llmjp_tokenizer):
    ours = spm.SentencePieceProcessor(model_file=str(world["tok"]))
    real = spm.SentencePieceProcessor(model_file=str(llmjp_tokenizer))

    def kind(sp, i):
        return (sp.is_unknown(i), sp.is_control(i), sp.is_unused(i), sp.is_byte(i))
    assert [real.id_to_piece(i) for i in range(264)] == [ours.id_to_piece(i) for i in range(264)]
    assert [kind(real, i) for i in range(300)] == [kind(ours, i) for i in range(300)]
    tok = Tokenizer(llmjp_tokenizer)
    assert tok.vocab_size == 99574 and (tok.mask_id, tok.pad_id, tok.cls_id, tok.sep_id) == (3, 4, 5, 6)


def test_tokenizer_finds_llm_jp_style_names(tmp_path):
    names = ["<MASK|LLM-jp>", "<PAD|LLM-jp>", "<CLS|LLM-jp>", "<SEP|LLM-jp>", "<EOD|LLM-jp>"]
    lines = ["富士山の標高は3776メートルです。", "1年は12ヶ月です。"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=300,
                                   byte_fallback=True, pad_id=-1, control_symbols=["<EOD|LLM-jp>"] + names[:4],
                                   hard_vocab_limit=False, logstream=open(os.devnull, "w"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    tok = Tokenizer(tmp_path / "m.model")
    assert tok.mask_id == sp.piece_to_id("<MASK|LLM-jp>") and tok.eod_id == sp.piece_to_id("<EOD|LLM-jp>") == 3


def test_tokenizer_without_special_pieces(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["あいうえお かきくけこ"] * 20), model_prefix=str(tmp_path / "m"),
                                   vocab_size=40, hard_vocab_limit=False, logstream=open(os.devnull, "w"))
    with pytest.raises(Problem, match="no <MASK> piece"):
        Tokenizer(tmp_path / "m.model")


def test_encode_pair(world):
    tok = Tokenizer(world["tok"])
    a, b = "富士山の標高は3776メートルです。", "1年は12ヶ月です。"
    ea, eb = tok.encode(a), tok.encode(b)
    assert tok.encode_pair(a) == [5] + ea + [6]
    assert tok.encode_pair(a, b) == [5] + ea + [6] + eb + [6]
    for n in range(3, len(ea) + 4):
        assert tok.encode_pair(a, max_len=n) == [5] + ea[:n - 2] + [6]
    for n in range(3, len(ea) + len(eb) + 4):
        ids = tok.encode_pair(a, b, max_len=n)
        assert len(ids) == min(n, len(ea) + len(eb) + 3) and ids.count(6) == 2 and ids[0] == 5
        i = ids.index(6)
        na, nb = i - 1, len(ids) - i - 2
        assert ids[1:i] == ea[:na] and ids[i + 1:-1] == eb[:nb]
        assert abs(na - nb) <= 1 or min(na, nb) == min(len(ea), len(eb))  # the longer one is cut first


def test_tokenizer_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "一つ目の文書です。"}\n{"text": "閉じていない\n')
    with pytest.raises(Problem, match=re.escape(f"{bad}:2: malformed JSON")):
        data.train_tokenizer(bad, 300, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
    notmodel = tmp_path / "x.model"
    notmodel.write_text("not a model")
    with pytest.raises(Problem, match="not a sentencepiece model"):
        Tokenizer(notmodel)
    assert f"{bad}:2: malformed JSON" in run_cli(capsys, "tokenizer", "--input", bad, "--vocab_size", 300, "--out", tmp_path / "t.model")


def test_tokenizer_vocab_too_large(world, tmp_path):
    with pytest.raises(Problem, match="Vocabulary size too high") as e:
        data.train_tokenizer(world["inputs"][2], 50_000, tmp_path / "big.model")
    assert "\n" not in str(e.value) and not (tmp_path / "big.model").exists()

# ----------------------------------------------------------------------------------------------------------
# shards


def check_round_trip(shard_dir, texts, model, val_fraction):
    """Shards hold sentencepiece's own encoding of every non-empty text, split by the hash rule, in input order."""
    encoded = sp_encode(model, texts)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for split, want_val in (("train", False), ("val", True)):
        want = [ids for t, ids in zip(texts, encoded) if t and in_val(t, val_fraction) == want_val]
        shards = Shards(shard_dir, split)
        assert len(shards) == len(want)
        for i, ids in enumerate(want):
            assert shards[i].tolist() == ids
        assert sp.decode(shards[len(want) // 2].tolist()) == [t for t in texts if t and in_val(t, val_fraction) == want_val][len(want) // 2]
        manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
        assert manifest["splits"][split]["tokens"] == sum(map(len, want))


def test_round_trip(world):
    assert len(world["manifest"]["splits"]["train"]["shards"]) > 3  # byte ranges, split across workers
    check_round_trip(world["shards"], world["texts"], world["tok"], 0.1)
    assert world["manifest"]["dtype"] == "uint16"


def test_round_trip_llm_jp_tokenizer(world, tmp_path, llmjp_tokenizer):
    texts = world["texts"][:40] + ODD_TEXTS
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in texts))
    manifest = data.prepare(tmp_path / "x.jsonl", llmjp_tokenizer, tmp_path / "s", text_field="body", val_fraction=0.2)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 99574
    check_round_trip(tmp_path / "s", texts, llmjp_tokenizer, 0.2)


def test_prepare_is_independent_of_workers_and_skips_finished_shards(world, tmp_path):
    shutil.copytree(world["shards"], tmp_path / "s")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("*.bin")}
    again = data.prepare(world["inputs"], world["tok"], tmp_path / "s", workers=1, val_fraction=0.1, chunk_bytes=60_000)
    n_tasks = len(list((tmp_path / "s").glob("0*.json")))
    assert again["skipped_shards"] == n_tasks and again["splits"] == world["manifest"]["splits"]
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("*.bin")}
    # a damaged shard is rebuilt on the next run, the others are kept
    victim = tmp_path / "s" / world["manifest"]["splits"]["train"]["shards"][1]["bin"]
    good = victim.read_bytes()
    victim.write_bytes(good[:-2] + b"\x00\x00")
    again = data.prepare(world["inputs"], world["tok"], tmp_path / "s", workers=2, val_fraction=0.1, chunk_bytes=60_000)
    assert again["skipped_shards"] == n_tasks - 1 and victim.read_bytes() == good


def test_read_jsonl_and_txt(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"sentence": "あ", "label": 1}\n\n{"sentence": "い", "label": 0}\n')
    assert list(data.read_jsonl(p)) == [(1, {"sentence": "あ", "label": 1}), (3, {"sentence": "い", "label": 0})]
    assert list(data.read_jsonl(p, "sentence")) == [(1, "あ"), (3, "い")]
    q = tmp_path / "y.txt"
    q.write_text("一つ目\n\n二つ目\r\n")
    assert list(data.iter_documents(q)) == [(1, "一つ目"), (3, "二つ目")]


@pytest.mark.parametrize("name", ["x.jsonl", "x.txt", "x.jsonl.gz"])
def test_a_last_line_without_a_newline_is_a_document(world, tmp_path, name):
    """Every document of an input whose last line has no newline, read whole or in byte ranges of any size."""
    texts = [t.replace("\n", " ") for t in world["texts"][:30]]
    lines = [json.dumps({"text": t}, ensure_ascii=False) if "jsonl" in name else t for t in texts]
    raw = "\n".join(lines).encode("utf-8")
    assert not raw.endswith(b"\n")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert [t for _, t in data.iter_documents(path)] == texts
    last = len(raw) - len(lines[-1].encode("utf-8"))
    for chunk_bytes in (len(raw), 1000, last, last + 1):  # the last line alone in a range; cut inside it
        out = tmp_path / f"s{chunk_bytes}"
        data.prepare(path, world["tok"], out, workers=2, val_fraction=0.1, chunk_bytes=chunk_bytes)
        check_round_trip(out, texts, world["tok"], 0.1)


def test_prepare_counts_and_prints_what_it_wrote(world, tmp_path, capsys):
    """The manifest counts empty texts (not blank lines), and the command's summary line gives each split's
    documents and tokens as sentencepiece and the split rule count them; an input whose only document falls in
    the val split is no error."""
    texts = world["texts"][:40]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:20]] + ["", {"text": ""}, "  ", {"text": ""}]
                    + [{"text": t} for t in texts[20:]])
    only_val = next(t for t in world["texts"][40:] if in_val(t, 0.2))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": only_val}])
    data.main(["prepare", "--input", str(a), str(b), "--tokenizer", str(world["tok"]), "--out", str(tmp_path / "s"),
               "--val_fraction", "0.2"])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["empty_texts"] == 2
    docs = {s: [t for t in texts + [only_val] if in_val(t, 0.2) == (s == "val")] for s in ("train", "val")}
    n = {s: (len(d), sum(map(len, sp_encode(world["tok"], d)))) for s, d in docs.items()}
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"shards: train {n['train'][0]:,} docs / {n['train'][1]:,} tokens, val {n['val'][0]:,} docs / "
        f"{n['val'][1]:,} tokens (0 finished shards skipped)")


def json_text(line, field):
    """The reference: record[field] by json.loads, or None where the line is not a record with a string field."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    text = record.get(field) if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def test_text_field_fast_path_agrees_with_json_loads():
    """_plain_text answers record[field] exactly as json.loads does, or None (json.loads then decides), on
    escapes, surrogates, fields in any order, nested and duplicate keys, malformed lines and every prefix."""
    texts = ["plain", 'say "hi"', "back\\slash \\n not a newline", "改行\nと\tタブ\rと\x00制御文字", "emoji 🗻 𝔘",
             "\u2028\u2029\x85", "", " ", "\\", '"', "\\\"", "\ud800 lone", "end \\"]
    lines = []
    for field in ("text", "body", 'odd "key"', "本文"):
        for t in texts:
            for ascii_only in (True, False):
                dump = lambda obj, **kw: json.dumps(obj, ensure_ascii=ascii_only, **kw)  # noqa: E731
                lines += [(field, dump({field: t})), (field, dump({field: t}, separators=(",", ":"))),
                          (field, dump({field: t, "meta": {field: "nested", "n": [1, {field: 2}]}})),
                          (field, dump({"id": 1, field: t})), (field, dump({field: t, "x": None}) + " \t\r\n"),
                          (field, dump({field: t})[:-1] + ', ' + dump(field) + ': "last wins"}'),
                          (field, dump({field: t})[:-1] + ', ' + dump(field) + ': 5}'),
                          (field, dump({field: t})[:-1] + ", }"), (field, dump({field: t}) + " extra"),
                          (field, dump({field: t})[:-1] + ', "x": }'), (field, dump({field: 7, "x": t}))]
    lines += [("text", '{"text": "bad \\x escape"}'), ("text", '{"text": "bad \\u12"}'), ("text", '{"text": "raw\ttab"}'),
              ("text", '{"text": "a", "m": 1e999}'), ("text", '{"text": "a", "m": NaN}'), ("text", '{"text" : "a"}'),
              ("text", '{"text": "\\ud83d\\uddfb"}'), ("text", '{"text": "\\udc00\\ud800"}'), ("text", '{"text": "a"}}')]
    lines += [(f, line[:n]) for f, line in lines[:60] for n in range(len(line))]  # every truncation
    fast = 0
    for field, line in lines:
        got = data._plain_text(line, field)
        if got is not None:
            fast += 1
            assert got == json_text(line, field), (field, line)
    assert fast > 250  # the common layouts take the fast path
    assert data._plain_text('{"text": "a", "text": "b"}', "text") is None  # duplicates: json.loads decides
    assert data._plain_text('{"text": "a",}', "text") is None

# ----------------------------------------------------------------------------------------------------------
# bad input: one line naming what and where, ranks.Problem for library users, `error: ...` and exit 1 on the command line


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        data.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and "\n" not in err
    return err


def prepare_cli(capsys, inputs, tok, out, workers=2, replace=True):
    """With replace, a failed run must still leave the dataset it would replace as it was."""
    return run_cli(capsys, "prepare", "--input", *inputs, "--tokenizer", tok, "--out", out, "--workers", workers,
                   *(["--replace"] if replace else []))


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def intact(d, before):
    """Every file of the earlier output is still there, byte for byte, and no temporary file is left."""
    now = snapshot(d)
    return all(now.get(k) == v for k, v in before.items()) and not [k for k in now if ".tmp" in k]


@pytest.fixture
def prior(world, tmp_path):
    """A finished shard directory whose contents must survive every failed run."""
    out = tmp_path / "prior"
    shutil.copytree(world["shards"], out)
    return out, snapshot(out)


def test_missing_and_empty_inputs(world, tmp_path, capsys, prior):
    out, before = prior
    err = prepare_cli(capsys, [tmp_path / "nope.jsonl"], world["tok"], out)
    assert "nope.jsonl: no such file" in err
    assert "no files match" in prepare_cli(capsys, [str(tmp_path / "*.jsonl")], world["tok"], out)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl: empty file" in prepare_cli(capsys, [tmp_path / "empty.jsonl"], world["tok"], out)
    (tmp_path / "blank.jsonl").write_text('\n{"text": ""}\n\n')
    assert "blank.jsonl: no documents" in prepare_cli(capsys, [tmp_path / "blank.jsonl"], world["tok"], out)
    assert "tokenizer file not found" in prepare_cli(capsys, world["inputs"], tmp_path / "none.model", out)
    assert "no such file" in run_cli(capsys, "tokenizer", "--input", tmp_path / "nope.txt", "--vocab_size", 100, "--out", tmp_path / "t.model")
    assert intact(out, before)


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_lines_name_file_and_line(world, tmp_path, capsys, prior, workers):
    out, before = prior
    good = [json.dumps({"text": f"文書{i}は正しい行です。" * 50}, ensure_ascii=False) for i in range(400)]
    cases = {  # line 301 is bad; with small chunks it falls in a later byte range than the first
        "json.jsonl": (b'{"text": "closing brace missing"', "malformed JSON"),
        "utf8.jsonl": ('{"text": "壊れた'.encode() + b"\xff\xfe" + '"}'.encode(), "not valid UTF-8"),
        "field.jsonl": (b'{"body": "no text field"}', "record has no 'text' field"),
        "type.jsonl": (b'{"text": 12}', "field 'text' is int, not a string"),
        "surrogate.jsonl": (b'{"text": "lone \\ud800 half"}', "field 'text' holds a lone surrogate \\ud800 (character 6)"),
        "surrogate2.jsonl": (b'{"id": 3, "text": "\\udfff"}', "field 'text' holds a lone surrogate \\udfff"),
        "digits.jsonl": (b'{"text": "a", "n": ' + b"7" * 5000 + b"}", "malformed JSON: Exceeds the limit"),
        "deep.jsonl": (b'{"text": "a", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed JSON: nested too deeply"),
        "deep2.jsonl": (b'{"n": ' + b"{\"a\": " * 50_000 + b"1" + b"}" * 50_000 + b', "text": "a"}', "malformed JSON: nested too deeply"),
    }
    for name, (bad, what) in cases.items():
        p = tmp_path / name
        p.write_bytes(("\n".join(good[:300]) + "\n").encode() + bad + ("\n" + "\n".join(good[300:]) + "\n").encode())
        with pytest.raises(Problem, match=re.escape(f"{p}:301: {what}")):
            data.prepare(p, world["tok"], out, workers=workers, chunk_bytes=20_000, replace=True)
        assert f"{p}:301: {what}" in prepare_cli(capsys, [p], world["tok"], out, workers)
    txt = tmp_path / "bad.txt"
    txt.write_bytes("一行目\n二行目\n".encode() + b"\xc3\x28\n")
    assert f"{txt}:3: not valid UTF-8" in prepare_cli(capsys, [txt], world["tok"], out, workers)
    assert intact(out, before)
    Loader(out, batch_size=4, micro_batch_size=4)  # still verifies


def test_damaged_shards_and_foreign_tokenizer(world, tmp_path, capsys, prior):
    out, before = prior
    other = data.train_tokenizer(world["inputs"][1], 900, tmp_path / "other.model")
    err = prepare_cli(capsys, world["inputs"], other, out, replace=False)
    assert "another tokenizer" in err
    with pytest.raises(Problem, match="does not match"):
        Loader(out, batch_size=4, micro_batch_size=4, tokenizer=other)
    Loader(out, batch_size=4, micro_batch_size=4, tokenizer=world["tok"])
    assert intact(out, before)
    entry = world["manifest"]["splits"]["train"]["shards"][0]
    victim = out / entry["bin"]
    victim.write_bytes(before[entry["bin"]][:-10])
    with pytest.raises(Problem, match=re.escape(str(victim)) + r".*truncated"):
        Shards(out, "train")
    victim.write_bytes(before[entry["bin"]][:-2] + b"\x01\x00")
    with pytest.raises(Problem, match=re.escape(str(victim)) + r": sha256 differs.*altered") as e:
        Loader(out, batch_size=4, micro_batch_size=4)
    assert "\n" not in str(e.value)
    Shards(out, "val")  # the other split is untouched
    (out / "manifest.json").unlink()
    with pytest.raises(Problem, match="manifest.json: not found"):
        Shards(out)


def test_another_dataset_is_replaced_only_when_asked(world, tmp_path, capsys, prior):
    out, before = prior
    err = prepare_cli(capsys, [world["inputs"][2]], world["tok"], out, replace=False)
    assert err == f"error: {out} holds another dataset (made from {world['inputs'][0]} and 2 more, with other " \
                  "inputs or settings); use a new output directory, or --replace to replace it"
    assert "another dataset" in prepare_cli(capsys, world["inputs"], world["tok"], out, replace=False)  # 1 worker
    assert intact(out, before)
    data.main(["prepare", "--input", world["inputs"][2], "--tokenizer", str(world["tok"]), "--out", str(out), "--replace"])
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {e[k] for s in manifest["splits"].values() for e in s["shards"] for k in ("bin", "idx")}
    assert {p.name for p in out.glob("*.bin")} | {p.name for p in out.glob("*.idx")} == listed
    texts = [t.replace("\n", " ") for t in world["texts"][-60:]]
    assert len(Shards(out, "train")) + manifest["splits"]["val"]["docs"] == len(texts)
    again = data.prepare(world["inputs"][2], world["tok"], out)  # the same dataset again: nothing to replace
    assert again["skipped_shards"] == len(list(out.glob("0*.json")))


def test_unwritable_output_dir(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, why in ((tmp_path / "file" / "shards", "Not a directory"), (Path("/sys/modernbert-shards"), "Operation not permitted")):
        assert prepare_cli(capsys, [world["inputs"][2]], world["tok"], out) == f"error: {out}: cannot write there ({why})"


def test_one_prepare_at_a_time(world, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running prepare (or its workers) holds it
        with pytest.raises(Problem, match=re.escape(f"{out}: another prepare is writing there")):
            data.prepare(world["inputs"][2], world["tok"], out)
    finally:
        os.close(held)
    data.prepare(world["inputs"][2], world["tok"], out)
    assert sorted(p.name for p in out.iterdir() if not data.SHARD_FILE.fullmatch(p.name)) == ["manifest.json"]


def test_kill_leaves_nothing_behind(world, tmp_path):
    """SIGKILL of prepare's main process: its workers exit, and the next run removes their temporary files."""
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"".join(Path(world["inputs"][0]).read_bytes() for _ in range(40)))
    out = tmp_path / "s"
    out.mkdir()
    (out / "train-00007-0123456789.bin.tmp-dead").write_bytes(b"left by an older run")
    proc = subprocess.Popen([sys.executable, str(ROOT / "data.py"), "prepare", "--input", str(big), "--tokenizer",
                             str(world["tok"]), "--out", str(out), "--workers", "2"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not [p for p in out.glob("*.tmp-*") if not p.name.endswith("dead")]:  # a worker is writing a shard
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    workers = children(proc.pid)
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while [p for p in workers if alive(p)]:
        assert time.time() < deadline, "a worker outlived the killed main process"
        time.sleep(0.05)
    # a process can show as exited while its last threads still hold its files (the lock among them): wait
    # for the lock, the state the next prepare needs
    while not lock_is_free(out):
        assert time.time() < deadline, "the killed prepare's lock was never released"
        time.sleep(0.05)
    assert not (out / "manifest.json").exists()
    manifest = data.prepare(big, world["tok"], out, workers=2)
    assert not list(out.glob("*.tmp-*"))
    n_docs = sum(1 for line in big.read_text(encoding="utf-8").splitlines() if json.loads(line)["text"])
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["val"]["docs"] == n_docs
    Shards(out, "train", verify=True)


def lock_is_free(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cli_exit_status(world, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--input", str(tmp_path / "nope.jsonl"),
                        "--tokenizer", str(world["tok"]), "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"

# ----------------------------------------------------------------------------------------------------------
# loader


def unmasked(mb):
    ids = mb["input_ids"].clone()
    sel = mb["labels"] != -100
    ids[sel] = mb["labels"][sel]
    return ids


def sequences(mb):
    cu = mb["cu_seqlens"].tolist()
    ids = unmasked(mb).tolist()
    return [ids[a:b] for a, b in zip(cu, cu[1:])]


def flat(batches):
    """All micro-batches of a list of steps, as (input_ids, labels, seqlens) concatenations."""
    mbs = [mb for step in batches for mb in step]
    return (torch.cat([m["input_ids"] for m in mbs]), torch.cat([m["labels"] for m in mbs]),
            torch.cat([m["cu_seqlens"].diff() for m in mbs]))


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def expected_docs(world, max_len=None):
    shards = Shards(world["shards"], "train")
    return [[5] + shards[i].tolist()[:None if max_len is None else max_len - 2] + [6] for i in range(len(shards))]


def test_line_by_line_epochs_cover_every_document_once(world):
    L = 64
    loader = Loader(world["shards"], batch_size=24, micro_batch_size=8, max_seqlen=L, seed=3)
    n = loader.samples_per_epoch
    steps = take(loader, -(-2 * n // 24) + 1)
    seqs = [s for step in steps for mb in step for s in sequences(mb)]
    want = Counter(map(tuple, expected_docs(world, L)))
    first, second = Counter(map(tuple, seqs[:n])), Counter(map(tuple, seqs[n:2 * n]))
    assert first == want and second == want and seqs[:n] != seqs[n:2 * n]  # reshuffled each epoch
    for step in steps:
        assert len(step) == 3
        for mb in step:
            assert mb["input_ids"].dtype == mb["labels"].dtype == torch.int64 and mb["cu_seqlens"].dtype == torch.int32
            assert mb["max_seqlen"] == int(mb["cu_seqlens"].diff().max()) <= L


def test_packed_rows_never_cross_documents(world):
    L = 100
    loader = Loader(world["shards"], batch_size=16, micro_batch_size=4, max_seqlen=L, mode="packed", seed=1)
    n = loader.samples_per_epoch
    assert n == -(-sum(len(d) for d in expected_docs(world)) // L)
    steps = take(loader, -(-n // 16))
    pieces = [s for step in steps for mb in step for s in sequences(mb)]
    totals = [int(mb["cu_seqlens"][-1]) for step in steps for mb in step]
    last = (n - 1) // 4  # the micro-batch holding the epoch's last row, the only short one
    assert all(t == 4 * L for k, t in enumerate(totals) if k != last) and totals[last] < 4 * L
    ends = set(np.cumsum([len(p) for p in pieces]).tolist())
    assert all(k * L in ends for k in range(1, n))  # rows are cut at multiples of max_seqlen
    for p in pieces:  # <CLS> only first, <SEP> only last: a piece is inside one document
        assert 5 not in p[1:] and 6 not in p[:-1] and 0 < len(p) <= L
    stream = [t for p in pieces for t in p]
    n_tokens = sum(len(d) for d in expected_docs(world))
    docs, cur = [], []
    for t in stream[:n_tokens]:  # the first epoch: every "<CLS> doc <SEP>" exactly once
        cur.append(t)
        if t == 6:
            docs.append(tuple(cur))
            cur = []
    assert Counter(docs) == Counter(map(tuple, expected_docs(world)))


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_resume_and_world_sizes(world, mode):
    G, L, steps = 12, 48, 8
    kw = dict(batch_size=G, max_seqlen=L, seed=7, mode=mode)
    ref = Loader(world["shards"], micro_batch_size=4, **kw)
    start = {**ref.state_dict(), "position": ref.samples_per_epoch - G // 2 - 1}  # a batch straddles two epochs
    ref.load_state_dict(start)
    full = take(ref, steps)
    for world_size, micro in ((1, 12), (1, 3), (2, 2), (4, 3)):
        ranks = [Loader(world["shards"], micro_batch_size=micro, rank=r, world_size=world_size, **kw) for r in range(world_size)]
        for rk in ranks:
            rk.load_state_dict(start)
        got = [take(rk, steps) for rk in ranks]
        for k in range(steps):
            assert all(len(g[k]) == G // (world_size * micro) for g in got)
            union = flat([g[k] for g in got])  # rank 0's slice, then rank 1's, ...: the global batch
            for a, b in zip(union, flat([full[k]])):
                assert torch.equal(a, b)
        # resume mid-way on each rank, element for element
        for r in range(world_size):
            rk = Loader(world["shards"], micro_batch_size=micro, rank=r, world_size=world_size, **kw)
            rk.load_state_dict(start)
            take(rk, 3)
            state = rk.state_dict()
            again = Loader(world["shards"], micro_batch_size=micro, rank=r, world_size=world_size, **kw)
            again.load_state_dict(state)
            for a, b in zip(take(again, steps - 3), got[r][3:]):
                for x, y in zip(a, b):
                    assert x["max_seqlen"] == y["max_seqlen"]
                    for key in ("input_ids", "labels", "cu_seqlens"):
                        assert torch.equal(x[key], y[key])


def test_resume_state_checks(world):
    a = Loader(world["shards"], batch_size=8, micro_batch_size=8, seed=0)
    for key, other in (("seed", dict(seed=1)), ("max_seqlen", dict(max_seqlen=64)),  # line_by_line: a cut
                       ("samples_per_epoch", dict(split="val"))):  # another dataset
        with pytest.raises(Problem, match=f"the loader state has {key}="):
            Loader(world["shards"], **{"batch_size": 8, "micro_batch_size": 8, "seed": 0, **other}).load_state_dict(
                a.state_dict())
    with pytest.raises(ValueError, match="not a multiple"):
        Loader(world["shards"], batch_size=12, micro_batch_size=4, world_size=2)


def test_eval_order_once(world):
    loader = Loader(world["shards"], split="val", batch_size=8, micro_batch_size=4, max_seqlen=10_000, shuffle=False)
    steps = list(loader)
    seqs = [s for step in steps for mb in step for s in sequences(mb)]
    shards = Shards(world["shards"], "val")
    assert seqs == [[5] + shards[i].tolist() + [6] for i in range(len(shards))]
    assert len(steps) == -(-len(shards) // 8) and list(loader) == []

# ----------------------------------------------------------------------------------------------------------
# the loader at corpus scale: the epoch order computed on demand, packed rows by cursor, maps that hold no
# descriptor, batches built in the background


def test_epoch_order_is_a_bijection():
    """Every size up to 129 and primes, powers of two and 2^k + 1 beyond, several seeds and epochs."""
    for n in [*range(1, 130), 251, 255, 256, 257, 1021, 1024, 1025, 4093, 4096, 4097, 65521, 65536, 65537]:
        for seed, epoch in ((0, 0), (0, 1), (3, 0), (12345, 7)):
            order = data._permute(np.arange(n), n, seed, epoch)
            assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n)), (n, seed, epoch)
    n = 100_003  # any positions, in any order, are the whole order's documents there
    pick = np.random.default_rng(0).integers(0, n, 1000)
    assert np.array_equal(data._permute(pick, n, 5, 2), data._permute(np.arange(n), n, 5, 2)[pick])


def test_epoch_order_looks_random():
    """Against what a uniformly random permutation gives: about one fixed point, no correlation between
    neighbouring positions nor between position and document, each tenth of the documents spread evenly over
    the positions, another order for every epoch and seed, and every order of a few documents."""
    n = 100_003
    orders = [data._permute(np.arange(n), n, 1, e) for e in range(6)] + [data._permute(np.arange(n), n, 2, 0)]
    fixed = 0
    for order in orders:
        fixed += int((order == np.arange(n)).sum())
        assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.015  # sd 1 / sqrt(n) = 0.003
        assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.015
        counts = np.histogram2d(np.arange(n), order, bins=10)[0]  # n / 100 in each cell
        assert (((counts - n / 100) ** 2) / (n / 100)).sum() < 140  # chi-square, 81 degrees of freedom: p ~ 1e-4
    assert fixed <= 20  # Poisson(7)
    for i in range(len(orders)):
        for j in range(i):
            assert abs(np.corrcoef(orders[i], orders[j])[0, 1]) < 0.015 and (orders[i] == orders[j]).sum() < 10
    seen = Counter(tuple(data._permute(np.arange(4), 4, seed, e)) for seed in range(4) for e in range(600))
    assert len(seen) == 24 and min(seen.values()) > 2400 / 24 / 2


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_batches_follow_the_epoch_order(world, mode):
    """Against a plain construction from Shards and the order, over three epochs: line_by_line sample i of
    epoch e is "<CLS> document order_e[i] <SEP>" truncated; packed rows cut the concatenation of those
    every max_seqlen tokens, across global batches, without a list of where each document starts."""
    L, G, seed = 40, 16, 9
    shards = Shards(world["shards"], "train")
    n = len(shards)
    docs = [[5] + shards[i].tolist() + [6] for i in range(n)]
    epochs = [[docs[i] for i in data._permute(np.arange(n), n, seed, e)] for e in range(3)]
    loader = Loader(world["shards"], batch_size=G, micro_batch_size=4, max_seqlen=L, seed=seed, mode=mode)
    steps = take(loader, 3 * loader.samples_per_epoch // G)
    got = [s for step in steps for mb in step for s in sequences(mb)]
    if mode == "line_by_line":
        want = [d[:L - 1] + [6] if len(d) > L else d for epoch in epochs for d in epoch]
        assert got == want[:len(got)]
    else:
        streams = [[t for d in epoch for t in d] for epoch in epochs]
        rows = [stream[a:a + L] for stream in streams for a in range(0, len(stream), L)]
        assert [t for s in got for t in s] == [t for row in rows[:len(steps) * G] for t in row]


def test_state_of_an_older_order_is_refused(world):
    loader = Loader(world["shards"], batch_size=8, micro_batch_size=8, mode="packed")
    state = loader.state_dict()
    old = {k: v for k, v in state.items() if k not in ("order", "cursor")}  # what data.py saved before
    with pytest.raises(Problem) as e:
        loader.load_state_dict(old)
    assert str(e.value) == ("cannot resume: the loader state was saved with document order 1, this data.py makes "
                            f"order {data.ORDER_VERSION} (other batches); start the run again in a new out_dir")
    loader.load_state_dict(state)


def test_state_of_another_masking_is_refused(world):
    """The loader state records the masking scheme, rate and split; another one stops the resume with one line."""
    a = Loader(world["shards"], batch_size=8, micro_batch_size=8, mode="packed", mlm_probability=0.3)
    next(iter(a))
    state = a.state_dict()
    assert state["masking"] == {"rate": 0.3, "mask": 0.8, "random": 0.1, "keep": 0.1}
    other = Loader(world["shards"], batch_size=8, micro_batch_size=8, mode="packed", mlm_probability=0.15)
    with pytest.raises(Problem) as e:
        other.load_state_dict(state)
    assert str(e.value) == ("cannot resume: the loader state was saved masking 30% of the tokens (80% <MASK>, 10% "
                            "random, 10% kept), this loader masks 15% of the tokens (80% <MASK>, 10% random, 10% "
                            "kept) (other masks); start the run again in a new out_dir")
    split = {**state, "masking": {"rate": 0.3, "mask": 0.9, "random": 0.05, "keep": 0.05}}
    same = Loader(world["shards"], batch_size=8, micro_batch_size=8, mode="packed", mlm_probability=0.3)
    with pytest.raises(Problem, match=r"saved masking 30% of the tokens \(90% <MASK>, 5% random, 5% kept\)"):
        same.load_state_dict(split)
    same.load_state_dict(state)  # the same scheme: the same next batch
    for x, y in zip(next(iter(same)), next(iter(a))):
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "cu_seqlens"))


def test_resuming_with_another_masking_rate_stops_with_one_line(tiny, by_count, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(by_count, out)
    shutil.rmtree(out / "ckpt_8")
    proc = train(tiny, out, "--mlm_probability=0.15", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: cannot resume: the loader state was saved masking 30% of the tokens (80% <MASK>, 10% random, 10% "
        "kept), this loader masks 15% of the tokens (80% <MASK>, 10% random, 10% kept) (other masks); start the run "
        "again in a new out_dir")


def test_resuming_a_run_of_an_older_order_stops_with_one_line(tiny, by_count, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(by_count, out)
    shutil.rmtree(out / "ckpt_8")
    own = torch.load(out / "ckpt_6" / "rank0.pt", weights_only=True)
    own["loader"] = {k: v for k, v in own["loader"].items() if k not in ("order", "cursor")}
    torch.save(own, out / "ckpt_6" / "rank0.pt")
    meta = json.loads((out / "ckpt_6" / "meta.json").read_text())  # recorded again, so the checkpoint verifies
    meta["files"]["rank0.pt"] = {"size": (out / "ckpt_6" / "rank0.pt").stat().st_size,
                                 "crc32": checkpoint.crc32(out / "ckpt_6" / "rank0.pt")}
    (out / "ckpt_6" / "meta.json").write_text(json.dumps(meta))
    proc = train(tiny, out, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: cannot resume: the loader state was saved with document order 1, this data.py makes order "
        f"{data.ORDER_VERSION} (other batches); start the run again in a new out_dir")


def same_steps(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for p, q in zip(x, y):
            assert p.keys() == q.keys() and p["max_seqlen"] == q["max_seqlen"]
            for key in ("input_ids", "labels", "cu_seqlens"):
                assert p[key].dtype == q[key].dtype and torch.equal(p[key], q[key])


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_prefetch_gives_the_same_batches_and_state(world, mode):
    """Built in the background, bit for bit the batches of plain iteration; the state after k batches handed out
    is plain iteration's after k (however many were built ahead), and resumes to the same batches."""
    for extra in (dict(micro_batch_size=3), dict(micro_batch_tokens=100)):
        make = lambda: Loader(world["shards"], batch_size=12, max_seqlen=48, seed=4, mode=mode,  # noqa: E731
                              world_size=2, rank=1, **extra)
        plain = make()
        start = {**plain.state_dict(), "position": plain.samples_per_epoch - 150}  # 20 steps to the epoch's end
        plain.load_state_dict(start)
        want = take(plain, 10)
        state = plain.state_dict()
        want += take(plain, 30)
        ahead = make()
        ahead.load_state_dict(start)
        batches = ahead.prefetch()
        got = [next(batches) for _ in range(10)]
        time.sleep(0.2)  # the thread builds ahead meanwhile
        assert ahead.state_dict() == state
        got += [next(batches) for _ in range(30)]
        same_steps(got, want)
        batches.close()
        resumed = make()
        resumed.load_state_dict(state)
        again = resumed.prefetch()
        same_steps([next(again) for _ in range(30)], want[10:])
        assert resumed.state_dict() == plain.state_dict()
    val = Loader(world["shards"], split="val", batch_size=8, micro_batch_size=4, shuffle=False, mode=mode)
    ahead = val.prefetch()
    same_steps(list(ahead), list(Loader(world["shards"], split="val", batch_size=8, micro_batch_size=4,
                                         shuffle=False, mode=mode)))
    assert list(ahead) == []


def test_prefetch_pins_memory_when_asked(world, monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())  # no CUDA here
    want = take(Loader(world["shards"], batch_size=8, micro_batch_size=4), 3)
    got = Loader(world["shards"], batch_size=8, micro_batch_size=4).prefetch(pin_memory=True)
    same_steps([next(got) for _ in range(3)], want)
    assert len(pinned) >= 3 * 2 * 3  # input_ids, labels and cu_seqlens of every micro-batch


def test_damaged_offsets_are_named_where_read(world, tmp_path):
    """Startup reads each .idx's first and last offset only; one between them is checked where its document is
    read: one line naming the shard's .idx and the document, from plain and background iteration alike."""
    shards = tmp_path / "s"
    shutil.copytree(world["shards"], shards)
    entry = world["manifest"]["splits"]["train"]["shards"][1]
    idx, tokens = shards / entry["idx"], entry["tokens"]
    good = np.fromfile(idx, dtype=np.int64)
    make = lambda: Loader(shards, batch_size=32, micro_batch_size=8, max_seqlen=10_000, verify=False,  # noqa: E731
                          shuffle=False)
    for doc, damaged, what in ((3, 4, good[3] - 1), (6, 7, tokens + 5)):  # ends before it starts; past the .bin
        bad = good.copy()
        bad[damaged] = what
        bad.tofile(idx)
        loader = make()
        message = (f"{idx}: the offsets of document {doc} are damaged ({bad[doc]} to {bad[doc + 1]}, the .bin "
                   f"holds {tokens} tokens); rerun `python data.py prepare` to rebuild it")
        with pytest.raises(Problem) as e:
            list(loader)
        assert str(e.value) == message
        with pytest.raises(Problem) as e:
            list(make().prefetch())
        assert str(e.value) == message
    for where, what in ((0, 1), (-1, tokens - 1)):
        bad = good.copy()
        bad[where] = what
        bad.tofile(idx)
        with pytest.raises(Problem, match=re.escape(f"{idx}: document offsets are damaged")):
            make()


def test_map_limit_is_named(world, monkeypatch):
    real = data._libc

    class Libc:  # as the kernel answers a process that holds vm.max_map_count maps
        munmap, madvise = real.munmap, real.madvise

        def mmap(self, address, length, prot, flags, fd, offset):
            if fd == -1:
                return real.mmap(address, length, prot, flags, fd, offset)
            ctypes.set_errno(errno.ENOMEM)
            return ctypes.c_void_p(-1).value
    monkeypatch.setattr(data, "_libc", Libc())
    with pytest.raises(Problem, match=r"\.bin: cannot map \(the \d+ maps a process may hold \(vm\.max_map_count\) "
                                        r"are in use; raise it with sysctl, or merge shards\)$"):
        Shards(world["shards"], verify=False)


def test_many_shards_under_a_low_open_file_limit(world, tiny, tmp_path):
    """2,000 shards, read and trained on under `ulimit -n 256` (one descriptor per map, as Python's mmap keeps,
    would need 4,000): the loader holds no descriptor per shard; a limit used up by something else is named."""
    tok = world["manifest"]["tokenizer"]
    many = bench.synthetic_shards(tmp_path / "many", 6000, 2000, tokenizer=tok, mean_tokens=30, val_docs=100)
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # noqa: E731
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import data
loader = data.Loader({str(many)!r}, batch_size=64, micro_batch_size=16, max_seqlen=64)  # verifies every file
batches = loader.prefetch()
for _ in range(200):  # every shard read (6,000 documents in 12,800 samples)
    next(batches)
print(len(os.listdir("/proc/self/fd")))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    data.Loader({str(many)!r}, batch_size=64, micro_batch_size=16, verify=False)
except data.Problem as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fds, message = proc.stdout.strip().splitlines()
    assert int(fds) <= 64
    assert message == f"{many / 'manifest.json'}: cannot read (the 256 open files allowed (ulimit -n) are in use)"
    proc = subprocess.run([sys.executable, "train.py", str(tiny), f"--out_dir={tmp_path / 'out'}",
                           f"--data_dir={many}", "--max_steps=3"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in curve(tmp_path / "out") if "loss" in m] == [1, 2, 3]


def test_memory_does_not_grow_with_the_documents(tmp_path):
    """Anonymous memory (private, unshareable) after Loader() and 30 stage-1 batches, each in a fresh process, on
    200,000 and 5,000,000 documents over the same 50 shards: under a byte more per added document (the design
    before kept 24-40 bytes per document: idx arrays, lengths, the stored order, starts)."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import bench, data
before = bench.memory()["anonymous"]
batches = data.Loader(sys.argv[1], batch_size=3328, micro_batch_size=26, max_seqlen=1024, world_size=16,
                      micro_batch_tokens=26624, verify=False).prefetch()
for _ in range(30):
    next(batches)
print(bench.memory()["anonymous"] - before)
"""
    grown = {}
    for n in (200_000, 5_000_000):
        bench.synthetic_shards(tmp_path / str(n), n, 50, sparse=True)
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / str(n))], env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        grown[n] = int(proc.stdout)
    assert abs(grown[5_000_000] - grown[200_000]) / 4_800_000 < 1.0, grown


def read_from_storage():
    return int(next(line for line in open("/proc/self/io") if line.startswith("read_bytes:")).split()[1])


def test_reads_fetch_what_they_use(world, tmp_path):
    """After the page cache drops the shards, reading documents through Shards fetches about their own pages
    from storage (madvise random), not the read-ahead window around each that a plain map of the file fetches."""
    d = bench.synthetic_shards(tmp_path / "d", 20_000, 4, tokenizer=world["manifest"]["tokenizer"])  # ~6 MB shards
    files = sorted(d.glob("*.bin")) + sorted(d.glob("*.idx"))
    shards = Shards(d, verify=False)
    docs, others = np.random.default_rng(0).choice(len(shards), (2, 50), replace=False)  # pages read stay mapped
    offsets = [np.fromfile(p, dtype=np.int64) for p in sorted(d.glob("train-*.idx"))]
    plain = [np.memmap(p, dtype=np.uint16, mode="r") for p in sorted(d.glob("train-*.bin"))]
    bench.evict(files)
    before = read_from_storage()
    useful = sum(len(shards[i]) * 2 for i in docs)
    ours = read_from_storage() - before
    bench.evict(files)
    before = read_from_storage()
    for i in others:
        s = int(np.searchsorted(shards.first_doc, i, side="right")) - 1
        j = i - shards.first_doc[s]
        plain[s][offsets[s][j]:offsets[s][j + 1]].copy()
    theirs = read_from_storage() - before
    if theirs == 0:
        pytest.skip("reads from storage are not counted here (/proc/self/io), or the page cache keeps the files")
    # per document: its pages (2-byte tokens, ~1.2 KB on average, so at most 2 pages but for the longest) and
    # one or two pages of offsets
    assert ours <= 4 * 4096 * len(docs) + useful, (ours, useful, theirs)

# ----------------------------------------------------------------------------------------------------------
# masking


def masking_stats(ids, out, labels, special, mask_id):
    ids, out, labels = ids.numpy(), out.numpy(), labels.numpy()
    is_special = np.isin(ids, list(special))
    sel = labels != -100
    assert not (sel & is_special).any() and (out[is_special] == ids[is_special]).all()
    assert (labels[sel] == ids[sel]).all() and (out[~sel] == ids[~sel]).all()
    assert not np.isin(out[sel & (out != ids) & (out != mask_id)], list(special)).any()
    n = sel.sum()
    return sel.sum() / (~is_special).sum(), (out[sel] == mask_id).sum() / n, (out[sel] == ids[sel]).sum() / n


def test_mask_tokens_statistics():
    V, special, mask_id = 1000, set(range(8)), 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (400_000,), generator=g)
    ids[::10] = 5
    out, labels = data.mask_tokens(ids, special, mask_id, V, generator=g, p=0.3)
    p, masked, kept = masking_stats(ids, out, labels, special, mask_id)
    # random replacements equal the original 1 time in V - 8
    assert abs(p - 0.3) < 0.004 and abs(masked - 0.8) < 0.005 and abs(kept - (0.1 + 0.1 / (V - 8))) < 0.004
    again, _ = data.mask_tokens(ids, special, mask_id, V, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(again, out)


def test_loader_masking_statistics(world):
    loader = Loader(world["shards"], batch_size=64, micro_batch_size=64, max_seqlen=512, mode="packed", seed=5)
    mbs = [mb for step in take(loader, 12) for mb in step]
    ids = torch.cat([unmasked(m) for m in mbs])
    out, labels = torch.cat([m["input_ids"] for m in mbs]), torch.cat([m["labels"] for m in mbs])
    assert len(ids) > 200_000
    p, masked, kept = masking_stats(ids, out, labels, set(range(8)), 3)
    assert abs(p - 0.3) < 0.005 and abs(masked - 0.8) < 0.006 and abs(kept - 0.1) < 0.005
    other = Loader(world["shards"], batch_size=64, micro_batch_size=64, max_seqlen=512, mode="packed", seed=5, mlm_probability=0.15)
    assert abs((take(other, 1)[0][0]["labels"] != -100).float().mean() - 0.15) < 0.01

# ----------------------------------------------------------------------------------------------------------
# demo corpus


def test_demo_corpus(world, tmp_path):
    paths = world["paths"]
    demo.write_demo(tmp_path, n_docs=400)
    for name in ("corpus.jsonl", "wiki.jsonl", "miracl.jsonl", "fillmask.txt"):  # deterministic
        assert (tmp_path / name).read_bytes() == (Path(paths["corpus"]).parent / name).read_bytes()
    texts = [json.loads(line)["text"] for line in open(paths["corpus"], encoding="utf-8")]
    corpus = "\n".join(texts)
    lengths = sorted(map(len, texts))
    assert lengths[0] < 20 and lengths[-1] > 3000
    for name, height, _ in demo.MOUNTAINS:  # facts agree across documents
        assert set(re.findall(re.escape(name) + r"の標高は(\d+)メートル", corpus)) <= {str(height)}
    for sentence in ("1年は12ヶ月です。", "1年はおよそ365日です。", "英語で「ありがとう」はthank youと言います。"):
        assert sentence in corpus
    prompts = paths["fillmask"].read_text().splitlines()
    assert prompts[:2] == ["{}は、地球上で最も高い山として知られています。", "1年は{}ヶ月です。"] and all("{}" in p for p in prompts)
    wiki = [r for _, r in data.read_jsonl(paths["wiki"])]
    assert {"id", "title", "text"} <= set(wiki[0]) and max(len(r["text"]) for r in wiki) > 6000
    miracl = [r for _, r in data.read_jsonl(paths["miracl"])]
    assert all(len(r["positive_passages"]) >= 2 and r["positive_passages"][0]["text"] != r["positive_passages"][1]["text"]
               for r in miracl)
    jsts = [r for _, r in data.read_jsonl(paths["jglue"] / "jsts-v1.3" / "valid-v1.3.json")]
    assert {r["label"] for r in jsts} == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    jnli = [r for _, r in data.read_jsonl(paths["jglue"] / "jnli-v1.3" / "train-v1.3.json")]
    assert Counter(r["label"] for r in jnli).keys() == {"entailment", "contradiction", "neutral"}
    for r in jnli:  # a contradiction changes the value: the two sentences differ in a number or a name
        if r["label"] == "contradiction":
            assert r["sentence1"] != r["sentence2"]
    for split_of, key in ((lambda s: paths["jglue"] / f"jsts-v1.3/{s}-v1.3.json", "sentence_pair_id"),
                          (lambda s: paths["jglue"] / f"jnli-v1.3/{s}-v1.3.json", "sentence_pair_id"),
                          (lambda s: paths["jcola"] / f"in_domain_{s}-v1.0.json", "uid")):
        ids = {s: [r[key] for _, r in data.read_jsonl(split_of(s))] for s in ("train", "valid")}
        assert len(set(ids["train"] + ids["valid"])) == len(ids["train"]) + len(ids["valid"])  # held out: disjoint
        assert len(ids["train"]) == (len(ids["train"]) + len(ids["valid"])) * 4 // 5
    jcola = [r for _, r in data.read_jsonl(paths["jcola"] / "in_domain_train-v1.0.json")]
    good = {r["sentence"] for r in jcola if r["label"] == 1}
    assert {r["label"] for r in jcola} == {0, 1} and not {r["sentence"] for r in jcola if r["label"] == 0} & good


def test_demo_command(tmp_path, capsys):
    """The whole demo path: synthetic text, tokenizer, shards; the Wikipedia-like set fills every length bin."""
    demo.main(["--out", str(tmp_path), "--workers", "2"])
    assert "shards: train" in capsys.readouterr().out
    loader = Loader(tmp_path / "shards", batch_size=8, micro_batch_size=8, tokenizer=tmp_path / "tokenizer.model")
    assert loader.tokenizer_info["vocab_size"] == 1500 and len(Shards(tmp_path / "shards", "val")) > 50
    wiki = [r["text"] for _, r in data.read_jsonl(tmp_path / "wiki.jsonl")]
    lengths = [len(ids) for ids in sp_encode(tmp_path / "tokenizer.model", wiki)]
    counts = np.histogram(lengths, [0, 1024, 2048, 4096, 8192])[0]
    assert counts.sum() == len(wiki) and (counts >= 30).all()

# ----------------------------------------------------------------------------------------------------------
# verification before training


def counting_hashes(monkeypatch):
    hashed = []
    real = data.sha256_file
    monkeypatch.setattr(data, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    return hashed


def test_shards_are_verified_once_on_any_number_of_ranks(world, tmp_path, monkeypatch):
    shards = tmp_path / "s"
    shutil.copytree(world["shards"], shards)
    entries = [e for s in world["manifest"]["splits"].values() for e in s["shards"]]
    every = sorted(e[k] for e in entries for k in ("bin", "idx"))
    hashed = counting_hashes(monkeypatch)
    shares = []
    for rank in range(2):
        assert data.verify_shards(shards, tmp_path / "run", rank, 2) is None
        shares.append(sorted(hashed))
        hashed.clear()
    assert sorted(shares[0] + shares[1]) == every and not set(shares[0]) & set(shares[1])
    sizes = [sum((shards / n).stat().st_size for n in share) for share in shares]
    assert abs(sizes[0] - sizes[1]) <= max((shards / n).stat().st_size for n in every)  # balanced by bytes
    for world_size in (1, 3):  # a restart on another number of ranks reads nothing again
        assert all(data.verify_shards(shards, tmp_path / "run", r, world_size) is None for r in range(world_size))
    assert hashed == []
    victim = shards / entries[2]["bin"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit, same size
    victim.write_bytes(bytes(raw))
    problems = [data.verify_shards(shards, tmp_path / "run", r, 2) for r in range(2)]
    assert hashed == [victim.name] and problems.count(None) == 1
    assert next(filter(None, problems)).startswith(f"{victim}: sha256 differs from the manifest")
    victim.write_bytes(bytes(raw[:-2]))
    assert "truncated" in data.verify_shards(shards, tmp_path / "run")
    assert data.verify_shards(shards, tmp_path / "elsewhere") is not None  # a fresh record reads everything


def test_token_outside_the_vocabulary_names_shard_and_document(world, tmp_path):
    shards = tmp_path / "s"
    shutil.copytree(world["shards"], shards)
    entry = world["manifest"]["splits"]["train"]["shards"][1]
    offsets = np.fromfile(shards / entry["idx"], dtype=np.int64)
    doc = 5
    tokens = np.fromfile(shards / entry["bin"], dtype=np.uint16)
    tokens[offsets[doc] + 1] = 60_000  # past the 1,000 pieces
    tokens.tofile(shards / entry["bin"])
    loader = Loader(shards, batch_size=32, micro_batch_size=8, max_seqlen=10_000, verify=False, shuffle=False)
    with pytest.raises(Problem) as e:
        list(loader)
    assert str(e.value).startswith(f"{shards / entry['bin']}: document {doc} holds token id 60000, outside the "
                                   "vocabulary of 1000")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(config, out, *args, cmd=(sys.executable,), check=True):
    proc = subprocess.run([*cmd, "train.py", str(config), f"--out_dir={out}", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny(world, tmp_path_factory):
    """A tiny model's config on the world's shards."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.py"
    path.write_text(f"""\
data_dir = "{world['shards']}"
tokenizer = "{world['tok']}"
model = "tiny"
model_args = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
max_seqlen = 128
batch_size = 16
micro_batch_size = 2
max_steps = 8
log_every = 1
checkpoint_every = 3
eval_every = 4
eval_batches = 2
lr = 3e-3
warmup_steps = 2
dtype = "float32"
""")
    return path


def test_training_stops_at_an_altered_shard(world, tiny, tmp_path):
    shards = tmp_path / "s"
    shutil.copytree(world["shards"], shards)
    victim = shards / world["manifest"]["splits"]["val"]["shards"][0]["bin"]
    raw = bytearray(victim.read_bytes())
    raw[7] ^= 0x10
    victim.write_bytes(bytes(raw))
    proc = train(tiny, tmp_path / "out", f"--data_dir={shards}", "--max_steps=1", check=False)
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert proc.returncode == 1 and not (metrics.exists() and metrics.read_text())  # not one step
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {victim}: sha256 differs from the manifest")

def test_two_processes_stop_at_a_shard_altered_in_rank_1_s_share(world, tiny, tmp_path, monkeypatch):
    """A shard file that only rank 1 hashes (each rank checks a share) altered: the two-process run stops before
    its first step with rank 1's line naming the file, and rank 0 says which rank stopped the job."""
    shards = tmp_path / "s"
    shutil.copytree(world["shards"], shards)
    hashed = counting_hashes(monkeypatch)
    assert data.verify_shards(shards, tmp_path / "probe", 1, 2) is None
    victim = shards / sorted(hashed)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    victim.write_bytes(bytes(raw))
    logs = tmp_path / "logs"  # each rank's stderr in a file of its own: two ranks' lines may interleave on one pipe
    proc = train(tiny, tmp_path / "out", f"--data_dir={shards}", "--max_steps=1", check=False,
                 cmd=(*TORCHRUN, f"--log-dir={logs}", "--redirects=2"))
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert proc.returncode != 0 and not (metrics.exists() and metrics.read_text())  # not one step
    host = socket.gethostname()
    errors = {int(f.parent.name): [line for line in f.read_text().splitlines() if line.startswith("error: ")]
              for f in logs.glob("*/attempt_0/*/stderr.log")}
    assert len(errors[0]) == len(errors[1]) == 1, errors
    assert errors[0][0].startswith(f"error: rank 0 ({host}): stopped by rank 1 ({host}): {victim}: sha256 differs"), errors
    assert errors[1][0].startswith(f"error: rank 1 ({host}): {victim}: sha256 differs from the manifest"), errors


# ----------------------------------------------------------------------------------------------------------
# micro-batches by token budget


def first_fit_decreasing(tokens, budget):
    """The plain algorithm, for reference: bins (sorted lists of sample positions) in the order opened."""
    bins, room = [], []
    for k in sorted(range(len(tokens)), key=lambda k: (-tokens[k], k)):
        for j in range(len(bins)):
            if room[j] >= tokens[k]:
                break
        else:
            j = len(bins)
            bins.append([])
            room.append(budget)
        bins[j].append(k)
        room[j] -= tokens[k]
    return sorted(sorted(b) for b in bins)


def test_pack_by_tokens():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, budget, world_size = int(rng.integers(1, 200)), int(rng.integers(64, 2000)), int(rng.integers(1, 6))
        tokens = np.minimum(rng.lognormal(4.5, 1.3, n).astype(np.int64) + 3, budget)
        plan = data.pack_by_tokens(tokens, budget, world_size)
        steps = len(plan[0])
        assert all(len(p) == steps for p in plan)  # every rank runs every micro-step
        bins = [m for p in plan for m in p if m]
        assert sorted(bins) == first_fit_decreasing(tokens.tolist(), budget)
        assert steps == -(-len(bins) // world_size) and all(tokens[m].sum() <= budget for m in bins)
        assert sorted(k for m in bins for k in m) == list(range(n))
        per_rank = [sum(int(tokens[m].sum()) for m in p if m) for p in plan]
        assert max(per_rank) - min(per_rank) <= budget  # balanced by tokens
        # dealt largest first in a snake, 0..W-1 then W-1..0: micro-step j is about equally full on every rank
        ordered = sorted(first_fit_decreasing(tokens.tolist(), budget), key=lambda m: (-int(tokens[m].sum()), m[0]))
        ordered += [[]] * (steps * world_size - len(ordered))
        for j in range(steps):
            group = ordered[j * world_size:(j + 1) * world_size]
            assert [p[j] for p in plan] == (group if j % 2 == 0 else group[::-1])
        assert data.pack_by_tokens(tokens, budget, world_size) == plan


def pieces(batches):
    """Every sequence (input ids with their labels) of a list of micro-batches, as a multiset."""
    found = Counter()
    for mb in batches:
        cu = mb["cu_seqlens"].tolist()
        for a, b in zip(cu, cu[1:]):
            found[(tuple(mb["input_ids"][a:b].tolist()), tuple(mb["labels"][a:b].tolist()))] += 1
    return found


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_token_budget_splits_the_same_global_batches(world, mode):
    """Whatever the budget and world size, the union of the ranks' micro-batches is the count-based global
    batch, masks included, and a run resumes across a change of either."""
    G, L, steps = 24, 64, 6
    kw = dict(batch_size=G, max_seqlen=L, seed=11, mode=mode)
    ref = Loader(world["shards"], micro_batch_size=G, **kw)
    start = {**ref.state_dict(), "position": ref.samples_per_epoch - G // 3}  # a batch straddles two epochs
    ref.load_state_dict(start)
    full = take(ref, steps)
    for world_size, budget in ((1, L), (1, 4 * L), (2, 2 * L), (3, 3 * L + 5)):
        ranks = [Loader(world["shards"], rank=r, world_size=world_size, micro_batch_tokens=budget, **kw)
                 for r in range(world_size)]
        for rk in ranks:
            rk.load_state_dict(start)
        got = [take(rk, steps) for rk in ranks]
        for k in range(steps):
            mbs = [mb for g in got for mb in g[k]]
            assert len({len(g[k]) for g in got}) == 1  # the same number of micro-steps on every rank
            assert all(int(mb["cu_seqlens"][-1]) <= budget for mb in mbs)
            assert pieces(mb for mb in mbs if not mb.get("empty")) == pieces(full[k])
            for mb in mbs:
                if mb.get("empty"):
                    assert (mb["labels"] == -100).all()
        # resumed mid-way with another budget and world size: the same global batches
        state = ranks[0].state_dict()
        assert all(rk.state_dict() == state for rk in ranks)
        other = [Loader(world["shards"], rank=r, world_size=2, micro_batch_tokens=5 * L, **kw) for r in range(2)]
        for rk in other:
            rk.load_state_dict(state)
        again = [take(rk, 2) for rk in other]
        ref2 = Loader(world["shards"], micro_batch_size=G, **kw)
        ref2.load_state_dict(state)
        for k, want in enumerate(take(ref2, 2)):
            assert pieces(mb for g in again for mb in g[k] if not mb.get("empty")) == pieces(want)
    if mode == "line_by_line":  # fewer micro-steps than 2-sequence micro-batches at the same peak tokens
        assert max(len(s) for s in take(Loader(world["shards"], micro_batch_tokens=2 * L, **kw), 4)) < G // 2


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_sample_tokens_are_the_samples_built(world, mode):
    """sample_tokens (what train.py plans micro-batches with at start) gives each sample's tokens as the loader
    builds it, one sample per micro-batch here, across an epoch's end."""
    G, L = 12, 64
    loader = Loader(world["shards"], batch_size=G, micro_batch_size=1, max_seqlen=L, seed=5, mode=mode)
    first = loader.samples_per_epoch - G - 5
    loader.load_state_dict({**loader.state_dict(), "position": first})
    built = [int(mb["cu_seqlens"][-1]) for batch in take(loader, 3) for mb in batch]
    assert loader.sample_tokens(first, 3 * G).tolist() == built
    assert len(set(built)) > 1  # lengths vary (packed: an epoch's last row is short), so the check can fail


def curve(out):
    keys = ("step", "loss", "grad_norm", "tokens", "val_loss", "val_acc")
    return [{k: v for k, v in json.loads(line).items() if k in keys}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got, want, rel=1e-6):
    """The same steps and token counts; losses and gradient norms to rel (fp32 sums in another order)."""
    assert [sorted(m) for m in got] == [sorted(m) for m in want] and len(want) >= 10
    for a, b in zip(got, want):
        assert (a["step"], a.get("tokens")) == (b["step"], b.get("tokens"))
        for key in ("loss", "grad_norm", "val_loss", "val_acc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=0), (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def by_count(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("count") / "out"
    train(tiny, out)
    return out


def test_token_budget_trains_like_count_one_process(tiny, by_count, tmp_path):
    budget = tmp_path / "budget"
    proc = train(tiny, budget, "--micro_batch_tokens=256")
    assert "micro-steps of <= 256 tokens" in proc.stdout
    assert_same_curve(curve(budget), curve(by_count))
    resumed = tmp_path / "resumed"  # from step 6 with another budget
    shutil.copytree(budget, resumed)
    shutil.rmtree(resumed / "ckpt_8")
    proc = train(tiny, resumed, "--micro_batch_tokens=640")
    assert "resuming from" in proc.stdout and "ckpt_6" in proc.stdout
    assert_same_curve(curve(resumed), curve(by_count))


def test_token_budget_trains_like_count_two_processes(tiny, tmp_path):
    count, budget = tmp_path / "count", tmp_path / "budget"
    train(tiny, count, cmd=TORCHRUN)
    train(tiny, budget, "--micro_batch_tokens=256", cmd=TORCHRUN)
    assert_same_curve(curve(budget), curve(count))


def test_token_budget_resumes_on_another_world_size(world, tiny, by_count, tmp_path):
    """1 process to step 6, then 2 processes with another budget: the 1-process curve. The share of empty
    micro-batches the start reports is the share the two ranks' loaders deal in the first 8 global batches."""
    one = tmp_path / "one"
    train(tiny, one, "--micro_batch_tokens=256")
    shutil.rmtree(one / "ckpt_8")
    proc = train(tiny, one, "--micro_batch_tokens=384", cmd=TORCHRUN)
    assert "written by 1 processes, now 2" in proc.stdout
    dealt = [mb.get("empty", False) for rank in range(2)
             for _, batch in zip(range(8), Loader(world["shards"], batch_size=16, max_seqlen=128, rank=rank, world_size=2,
                                                  micro_batch_tokens=384, verify=False)) for mb in batch]
    assert 0 < sum(dealt) and (f"{sum(dealt) / len(dealt):.0%} of the micro-batches of <= 384 tokens empty on 2 "
                               f"processes (the first 8 global batches)\n") in proc.stdout, proc.stdout
    assert_same_curve(curve(one), curve(by_count))


# ----------------------------------------------------------------------------------------------------------
# mixtures of corpora

@pytest.fixture(scope="module")
def small(world, tmp_path_factory):
    """A second corpus, made with the same tokenizer: 30 short documents (the demo's are long), each its own."""
    d = tmp_path_factory.mktemp("small")
    texts = [f"短い文書 {i} 番。" + "あ" * (i % 7) for i in range(30)]
    write_jsonl(d / "small.jsonl", [{"text": t} for t in texts])
    data.prepare([str(d / "small.jsonl")], world["tok"], d / "shards", val_fraction=0.0)
    return d / "shards"


def corpus_of(world, small, L):
    """Each sequence a document of either corpus can give (<CLS> doc[:L-2] <SEP>) -> (corpus, document; the
    small corpus's documents are all different, the large one's are not)."""
    large, short = map(tuple, expected_docs(world, L)), list(map(tuple, expected_docs({"shards": small}, L)))
    where = {doc: (0, None) for doc in large}
    assert len(set(short)) == len(short) and not where.keys() & set(short)
    return {**where, **{doc: (1, i) for i, doc in enumerate(short)}}


def test_mixture_shares_follow_the_weights_and_epochs_stay_whole(world, small):
    """Over 2,000 global batches of a 3:1 mixture: the tokens of each corpus, counted from the batches, are within 1%
    of 0.75 / 0.25, and the small corpus's documents come once per epoch, every epoch (it is read many times)."""
    L, G = 64, 8
    mix = data.Mixture({world["shards"]: 3, small: 1}, batch_size=G, micro_batch_size=4, max_seqlen=L, seed=5)
    where = corpus_of(world, small, L)
    tokens, order = [0, 0], []
    for step in take(mix, 2000):
        for mb in step:
            for seq in sequences(mb):
                c, i = where[tuple(seq)]
                tokens[c] += len(seq)
                if c == 1:
                    order.append(i)
    share = tokens[0] / sum(tokens)
    assert abs(share - 0.75) < 0.01 * 0.75 and abs((1 - share) - 0.25) < 0.01 * 0.25
    n = len(Shards(small))
    assert len(order) // n >= 10  # upsampled: many epochs of the small corpus
    for e in range(len(order) // n):
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # each epoch in its own order
    progress = mix.progress()
    assert [p["tokens"] for p in progress.values()] == tokens
    fresh = data.Mixture({world["shards"]: 3, small: 1}, batch_size=G, micro_batch_size=4, max_seqlen=L, seed=5)
    lengths = [len(seq) for step in take(fresh, 3) for mb in step for seq in sequences(mb)]  # in sample order
    assert fresh.sample_tokens(G, 2 * G).tolist() == lengths[G:]  # what train.py plans micro-batches from
    assert progress[str(small)]["epochs"] == pytest.approx(len(order) / n)


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_mixture_resume_and_world_sizes(world, small, mode):
    """A mixture's global batches are the same on 1, 2 and 3 ranks (by count and by token budget), and a state saved
    mid-way resumes to the same batches on another number of ranks."""
    G, L, steps = 12, 48, 8
    kw = dict(batch_size=G, max_seqlen=L, seed=7, mode=mode)
    corpora = {small: 2, world["shards"]: 1.5}
    ref = data.Mixture(corpora, micro_batch_size=4, **kw)
    full = take(ref, steps)
    assert sorted(flat([full[-1]])[0].tolist()) != sorted(flat([full[-2]])[0].tolist())
    for world_size, extra in ((1, dict(micro_batch_size=12)), (2, dict(micro_batch_size=3)),
                              (3, dict(micro_batch_tokens=100))):
        make = lambda r: data.Mixture(corpora, rank=r, world_size=world_size, **extra, **kw)  # noqa: E731
        ranks = [make(r) for r in range(world_size)]
        got = [take(rk, steps) for rk in ranks]
        for k in range(steps):
            if "micro_batch_size" in extra:
                union = flat([g[k] for g in got])  # rank 0's slice, then rank 1's, ...: the global batch
                for a, b in zip(union, flat([full[k]])):
                    assert torch.equal(a, b)
            else:
                seqs = lambda batches: sorted(  # noqa: E731
                    (tuple(s), tuple(mb["labels"][a:b].tolist()))
                    for step in batches for mb in step if not mb.get("empty")
                    for s, a, b in zip(sequences(mb), mb["cu_seqlens"][:-1].tolist(), mb["cu_seqlens"][1:].tolist()))
                assert seqs([g[k] for g in got]) == seqs([full[k]])
        for r in range(world_size):  # resume after 3 steps of a 1-rank run, on this number of ranks
            one = data.Mixture(corpora, micro_batch_size=4, **kw)
            take(one, 3)
            again = make(r)
            again.load_state_dict(json.loads(json.dumps(one.state_dict())))  # as a checkpoint stores it
            same_steps(take(again, steps - 3), got[r][3:])


@pytest.mark.parametrize("mode", ["line_by_line", "packed"])
def test_mixture_batches_without_a_corpus_and_ranks_without_a_sample(world, small, mode):
    """Global batches of 3 samples, 1 in 20 tokens from the small corpus: most batches hold none of it. By tokens on 8
    ranks, most ranks hold no sample at all and run empty micro-batches; the ranks together hold the 1-rank batch."""
    kw = dict(batch_size=3, max_seqlen=48, seed=7, mode=mode)
    corpora = {small: 1, world["shards"]: 20}
    full = take(data.Mixture(corpora, micro_batch_size=3, **kw), 6)
    got = [take(data.Mixture(corpora, rank=r, world_size=8, micro_batch_tokens=48, **kw), 6) for r in range(8)]
    for k in range(6):
        assert len({len(g[k]) for g in got}) == 1  # as many micro-steps on every rank
        assert sum(all(mb.get("empty") for mb in g[k]) for g in got) >= 5
        union = sorted(tuple(s) for g in got for mb in g[k] if not mb.get("empty") for s in sequences(mb))
        assert union == sorted(tuple(s) for mb in full[k] for s in sequences(mb)), k


def test_mixture_bad_inputs(world, small, tmp_path):
    for weights, message in (({world["shards"]: 1, small: -1}, "must be a number above 0, got -1"),
                             ({world["shards"]: 1, small: 0}, "must be a number above 0, got 0"),
                             ({world["shards"]: 1, small: "1"}, "must be a number above 0, got '1'"),
                             ({world["shards"]: 1, tmp_path / "nowhere": 1}, "manifest.json: not found"),
                             ({}, "names no corpus")):
        with pytest.raises(Problem, match=re.escape(message)):
            data.Mixture(weights, batch_size=8, micro_batch_size=8)
    tok = data.train_tokenizer([world["inputs"][0]], 900, tmp_path / "other.model")
    data.prepare([world["inputs"][2]], tok, tmp_path / "other", val_fraction=0.0)
    with pytest.raises(Problem, match=r"other was prepared with tokenizer other\.model .*share one tokenizer"):
        data.Mixture({world["shards"]: 1, tmp_path / "other": 1}, batch_size=8, micro_batch_size=8)
    with pytest.raises(Problem, match="does not match the one"):
        data.Mixture({world["shards"]: 1, tmp_path / "other": 1}, batch_size=8, micro_batch_size=8,
                     tokenizer=world["tok"])
    mix = data.Mixture({world["shards"]: 1, small: 1}, batch_size=8, micro_batch_size=8)
    with pytest.raises(Problem, match="the loader state is of the mixture"):
        data.Mixture({world["shards"]: 1, small: 2}, batch_size=8, micro_batch_size=8).load_state_dict(mix.state_dict())
    with pytest.raises(Problem, match="of one corpus, this run reads a mixture"):
        mix.load_state_dict(Loader(world["shards"], batch_size=8, micro_batch_size=8).state_dict())
