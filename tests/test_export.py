"""The Hugging Face export opened where users take a released encoder: transformers' AutoTokenizer (the ids of
sentencepiece itself), its fill-mask pipeline (evaluate.py's predictions), sentence-transformers (evaluate.py's
embeddings); and the repository beside the packages users install with it."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers  # the independent references: a pinned test dependency, as sentence-transformers
from sentence_transformers import SentenceTransformer

import checkpoint
import data
import evaluate as ev
from conftest import write_jsonl
from demo import write_demo
from model import ModernBERT, ModernBertConfig

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 640  # over 512, so that a cut at 512 (sentence-transformers' usual default) would be seen

# text that sentencepiece handles in every way it can: kana, kanji, Latin, digits, emoji, whitespace runs at
# either end and inside, tabs and newlines, full-width and compatibility characters (kept: no normalisation),
# characters outside any vocabulary (byte fallback), the empty text
VARIED = ["こんにちは、世界！", "東京は日本の首都です。", "ひらがな カタカナ 漢字 ｶﾀｶﾅ", "ModernBERT encodes 8,192 tokens.",
          "1234567890 3.14159 2026年12月5日", "絵文字 😀🎉👍🏽 と 🇯🇵", "  two leading, three   inside, two trailing  ",
          " ", "   ", "tab\tand\nnewline\n\nend\n", "\u3000全角スペース\u3000と　", "Ωmega straße ﬁne Ⅻ ①",
          "\ue000\U0010fffd 𠮷野家 𩸽", "a", "", "!?#$%&'()*+,-./:;=@[\\]^_`{|}~", "café naïve Zürich"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    paths = write_demo(root / "demo", n_docs=300)
    data.train_tokenizer(paths["corpus"], 1200, root / "tok.model")
    texts = [r["text"] for _, r in data.read_jsonl(paths["corpus"])]
    return root, paths, texts


@pytest.fixture(scope="module")
def export(corpus):
    """A tiny ModernBERT with the demo tokenizer, exported as train.py exports."""
    root, _, _ = corpus
    tok = data.Tokenizer(root / "tok.model")
    torch.manual_seed(0)
    model = ModernBERT(ModernBertConfig.preset(
        "tiny", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, local_attention=16, max_position_embeddings=POSITIONS, pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id, sep_token_id=tok.sep_id, mask_token_id=tok.mask_id)).eval()
    assert checkpoint.export_hf(model, root / "hf", tok.path, {"step": 0}) is None
    return root / "hf"


def sentencepiece_exported(tmp_path, model_file):
    tok = data.Tokenizer(model_file)
    for name, obj in data.hf_tokenizer(tok, POSITIONS).items():
        (tmp_path / name).write_text(json.dumps(obj, ensure_ascii=False))
    return tok, transformers.AutoTokenizer.from_pretrained(tmp_path)


def assert_same_ids(tok, hf, texts):
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))  # sentencepiece itself, not the project's wrapper
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf(text)["input_ids"] == [tok.cls_id, *ids, tok.sep_id], repr(text)
        assert hf.decode(ids) == sp.decode(ids), repr(text)
    texts = [t for t in texts if t]  # transformers reads an empty second text as none
    for a, b in zip(texts, texts[1:]):
        assert hf(a, b)["input_ids"] == [tok.cls_id, *sp.encode(a), tok.sep_id, *sp.encode(b), tok.sep_id]


def test_autotokenizer_gives_sentencepieces_ids(corpus, export):
    root, _, texts = corpus
    tok = data.Tokenizer(export / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(export)
    assert (hf.mask_token_id, hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id) == \
           (tok.mask_id, tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id)
    assert hf.model_max_length == POSITIONS and len(hf) == tok.vocab_size
    assert "token_type_ids" not in hf("a")  # ModernBERT takes none
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    assert any(sp.is_byte(i) for t in VARIED for i in sp.encode(t))  # the byte fallback is exercised
    assert_same_ids(tok, hf, texts + VARIED)


def test_autotokenizer_of_the_llmjp_tokenizer(tmp_path, corpus, llmjp_tokenizer):
    """llm-jp's model differs from ours: user-defined pieces (<MASK>, "\\n", ...), split digits, no splitting
    at whitespace."""
    _, _, texts = corpus
    tok, hf = sentencepiece_exported(tmp_path, llmjp_tokenizer)
    assert_same_ids(tok, hf, texts[:100] + VARIED)


@pytest.mark.parametrize("settings", [dict(normalization_rule_name="nmt_nfkc"),
                                      dict(normalization_rule_name="nfkc_cf", add_dummy_prefix=False),
                                      dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                           user_defined_symbols=["<br>", "県庁", "x"])])
def test_autotokenizer_of_other_sentencepiece_models(tmp_path, corpus, settings):
    """Sentencepiece models from elsewhere: normalising (a precompiled character map) and removing extra
    whitespace (sentencepiece's defaults), without the dummy prefix, or with user-defined pieces (always
    taken, even where other pieces would score higher); each with the llm-jp special-piece layout."""
    _, paths, texts = corpus
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for t in texts for line in t.split("\n") if line.strip()),
        model_prefix=str(tmp_path / "other"), model_type="unigram", vocab_size=800, byte_fallback=True,
        control_symbols=[f"<{n}>" for n in data.SPECIAL_NAMES], minloglevel=2, **settings)
    tok, hf = sentencepiece_exported(tmp_path, tmp_path / "other.model")
    extra = ["県庁所在地<br>県庁<br><br>", "xx xyz 県庁x", "box<br >"] if "user_defined_symbols" in settings else []
    assert_same_ids(tok, hf, texts[:100] + VARIED + extra)


def test_fill_mask_pipeline_gives_evaluates_predictions(tmp_path, export):
    prompts = ev.PAPER_PROMPTS + ["東京は日本の{}です。", "  {}は高い  "]
    write_jsonl(tmp_path / "prompts.txt", prompts)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ev.main(["--task", "fillmask", "--model", str(export), "--data", "prompts.txt", "--topk", "5",
                 "--mask_input", "hf"])
    finally:
        os.chdir(cwd)
    ours = json.loads((tmp_path / "out/eval/fillmask.json").read_text())["results"][str(export)]
    fill = transformers.pipeline("fill-mask", model=str(export), top_k=5)
    for prompt, mine in zip(prompts, ours):
        theirs = fill(prompt.replace("{}", fill.tokenizer.mask_token))
        assert [t["token"] for t in theirs] == [t["id"] for t in mine["top"]], prompt
        assert [t["token_str"] for t in theirs] == [t["token"] for t in mine["top"]], prompt
        # the same softmax: this model's vocabulary is exactly the tokenizer's pieces
        assert [t["score"] for t in theirs] == pytest.approx([t["prob"] for t in mine["top"]], rel=1e-5)


def test_sentence_transformers_gives_evaluates_embeddings(corpus, export):
    """Mean pooling over <CLS> text <SEP> cut at the model's positions, L2-normalised: evaluate.py's embeddings,
    for texts longer than 512 tokens and than the model's positions too."""
    _, _, texts = corpus
    tok = data.Tokenizer(export / "tokenizer.model")
    lengths = [len(tok.encode(t)) for t in texts]
    chosen = [t for t, n in zip(texts, lengths) if n > POSITIONS][:3] + \
             [t for t, n in zip(texts, lengths) if 512 < n <= POSITIONS][:2] + texts[:6] + VARIED[:4]
    assert sum(len(tok.encode(t)) > POSITIONS for t in chosen) >= 2
    st = SentenceTransformer(str(export), device="cpu")
    assert st.max_seq_length == POSITIONS
    model = ModernBERT.from_pretrained(export).eval()
    with torch.no_grad():
        ours = ev.embed(model, tok, chosen, max_len=POSITIONS, token_budget=700)
        cut512 = ev.embed(model, tok, chosen, max_len=512, token_budget=700)
    theirs = torch.from_numpy(st.encode(chosen, batch_size=4))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (cut512 - ours).abs().max() > 1e-3  # where the cut is made shows
    assert torch.allclose(theirs.norm(dim=-1), torch.ones(len(chosen)), atol=1e-6)


def test_export_cli_writes_every_file_and_unnormalized_drops_the_l2(tmp_path, export):
    """--unnormalized: sentence-transformers gives the mean-pooled vectors themselves."""
    files = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "config.json", "config_sentence_transformers.json", "model.safetensors",
                     "modules.json", "sentence_bert_config.json", "tokenizer.json", "tokenizer.model",
                     "tokenizer_config.json", "training.json"]
    model = ModernBERT.from_pretrained(export).eval()
    checkpoint.export_hf(model, tmp_path / "raw", export / "tokenizer.model", {"step": 0}, normalize=False)
    tok = data.Tokenizer(export / "tokenizer.model")
    texts = ["東京は日本の首都です。", "山は高い"]
    with torch.no_grad():
        ids = [torch.tensor(tok.encode_pair(t)) for t in texts]
        want = torch.stack([model.encode(i[None])[0] for i in ids])
    got = torch.from_numpy(SentenceTransformer(str(tmp_path / "raw"), device="cpu").encode(texts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not (want.norm(dim=-1) - 1).abs().lt(1e-3).any()


def test_export_without_its_tokenizer_says_so(tmp_path, export):
    model = ModernBERT.from_pretrained(export)
    assert checkpoint.export_hf(model, tmp_path / "hf", tmp_path / "gone.model", {}) == tmp_path / "gone.model"
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "config.json").is_file()


# -----------------------------------------------------------------------------------------------------------
# beside the packages users install


def shadowed(root):
    """The repository's top-level modules and packages that are also top-level modules of an installed
    distribution: from the repository root, `import NAME` would find ours instead of theirs."""
    installed = importlib.metadata.packages_distributions()
    ours = {p.stem for p in Path(root).glob("*.py")} | \
           {p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".") and
            (any(p.glob("*.py")) or (p / "__init__.py").is_file())}
    return {name: installed[name] for name in sorted(ours) if name in installed}


def test_no_top_level_name_shadows_an_installed_distribution(tmp_path):
    installed = importlib.metadata.packages_distributions()
    assert {"transformers", "kernels"} <= installed.keys()  # what the suite runs beside, as users do
    assert shadowed(ROOT) == {}
    (tmp_path / "kernels").mkdir()  # the folder's name of old: Hugging Face's kernels, which transformers imports
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "train.py").write_text("")
    assert shadowed(tmp_path) == {"kernels": installed["kernels"]}


def test_transformers_model_imports_from_the_repository_root():
    """What failed when a folder of ours was named `kernels`: transformers imports Hugging Face's."""
    code = "import transformers; transformers.ModernBertForMaskedLM; transformers.BertForMaskedLM; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
