"""model.py against Hugging Face transformers' ModernBERT (the independent reference), fp32 on the CPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transformers
from torch.utils.flop_counter import FlopCounterMode

import model
from model import ModernBERT, ModernBertConfig, ModernBertForSequenceClassification, visible_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

# small configs covering windows (w = local_attention // 2 = 1, 2, 4, 64), global_attn_every_n_layers, thetas
CONFIGS = [
    dict(local_attention=8, global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0),
    dict(local_attention=2, global_attn_every_n_layers=2, global_rope_theta=10000.0, local_rope_theta=10000.0),
    dict(local_attention=4, global_attn_every_n_layers=1, global_rope_theta=5000.0, local_rope_theta=300.0),
    dict(local_attention=128, global_attn_every_n_layers=3, global_rope_theta=10000.0, local_rope_theta=10000.0),
]


def tiny(**kw):
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                pad_token_id=4, cls_token_id=5, sep_token_id=6, mask_token_id=3)
    return ModernBertConfig(**{**base, **kw})


def hf_config(cfg, old_style, **extra):
    """A transformers ModernBertConfig built from either generation of keyword names."""
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              local_attention=cfg.local_attention, pad_token_id=cfg.pad_token_id, cls_token_id=cfg.cls_token_id,
              sep_token_id=cfg.sep_token_id, bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id, **extra)
    if old_style:
        kw.update(global_attn_every_n_layers=cfg.global_attn_every_n_layers,
                  global_rope_theta=cfg.global_rope_theta, local_rope_theta=cfg.local_rope_theta)
    else:
        n = cfg.global_attn_every_n_layers
        kw.update(layer_types=["full_attention" if i % n == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}})
    return transformers.ModernBertConfig(**kw)


def batch(vocab, lengths, seed=0):
    """Right-padded random batch with these lengths: (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(7, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 4), mask


def randomize(model, seed):
    """Weights of unit scale (std fan_in^-1/2), non-trivial norms and biases, so attention is sharp and a
    wrong rotary angle, window or norm shows up in the logits (0.02-std init makes attention near uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model


LENGTHS = [1, 37, 150, 9, 2]  # odd lengths, one token, and a long row beside short ones


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_hf_to_ours_logits(tmp_path, i):
    cfg = tiny(**CONFIGS[i])
    torch.manual_seed(i)
    hf = randomize(transformers.ModernBertForMaskedLM(hf_config(cfg, old_style=i % 2 == 0)), i).eval()
    hf.save_pretrained(tmp_path)
    ours = ModernBERT.from_pretrained(tmp_path).eval()
    assert ours.config.global_attn_every_n_layers == cfg.global_attn_every_n_layers
    assert ours.config.global_rope_theta == cfg.global_rope_theta and ours.config.local_rope_theta == cfg.local_rope_theta
    ids, mask = batch(cfg.vocab_size, LENGTHS, seed=i)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out, _ = ours(ids, mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= TOL
    assert (out[~real] == 0).all()


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_ours_to_hf_logits(tmp_path, i):
    cfg = tiny(**CONFIGS[i])
    torch.manual_seed(10 + i)
    ours = randomize(ModernBERT(cfg), i).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = batch(cfg.vocab_size, LENGTHS[::-1], seed=i)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out, _ = ours(ids, mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= TOL


@pytest.mark.parametrize("path", ["reference", "kernels"])
@pytest.mark.parametrize("w", [4, 64])
def test_window_edge_lengths_match_hf(tmp_path, monkeypatch, path, w):
    """Sequences of w+1 .. 2w+2 tokens, where a local layer sees some but not all of its sequence: alone, and
    as the longest of a batch, on the reference path and on the kernels, against transformers."""
    cfg = tiny(local_attention=2 * w, global_attn_every_n_layers=2, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(w)
    hf = randomize(transformers.ModernBertForMaskedLM(hf_config(cfg, old_style=False)), w).eval()
    hf.save_pretrained(tmp_path)
    ours = ModernBERT.from_pretrained(tmp_path).to(DEVICE).eval()
    monkeypatch.setattr(model, "ATTENTION", path)
    for n in (w + 1, w + 2, 2 * w, 2 * w + 1, 2 * w + 2):
        for lengths in ([n], [n // 2, n, 3, w + 1]):
            ids, mask = batch(cfg.vocab_size, lengths, seed=n)
            with torch.no_grad():
                ref = hf(input_ids=ids, attention_mask=mask).logits
                out = ours(ids.to(DEVICE), mask.to(DEVICE))[0].cpu()
            real = mask.bool()
            err = (out[real] - ref[real]).abs().max().item()
            assert err <= TOL, f"{path}, window {w}, lengths {lengths}: max logit error {err:.3g}"


def test_old_style_config_json_is_read(tmp_path):
    """A config.json of the first transformers generation: global_rope_theta etc. and no layer_types."""
    cfg = tiny(local_attention=4, global_attn_every_n_layers=2, global_rope_theta=160000.0)
    ModernBERT(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        conf.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    loaded = ModernBERT.from_pretrained(tmp_path).config
    assert (loaded.global_attn_every_n_layers, loaded.global_rope_theta, loaded.local_rope_theta) == (2, 160000.0, 10000.0)


def test_rope_parameters_without_sliding_attention_take_transformers_local_default(tmp_path):
    """A config.json whose rope_parameters name only full_attention: the local theta is transformers' default
    for sliding attention (10,000), not the global theta."""
    cfg = tiny(local_attention=4, global_attn_every_n_layers=2, global_rope_theta=160000.0)
    ModernBERT(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    for key in ("global_rope_theta", "local_rope_theta"):
        conf.pop(key)
    conf["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 160000.0}}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    reference = transformers.ModernBertConfig(rope_parameters=conf["rope_parameters"]).rope_parameters
    assert reference["sliding_attention"]["rope_theta"] == 10000.0
    loaded = ModernBERT.from_pretrained(tmp_path).config
    assert (loaded.global_rope_theta, loaded.local_rope_theta) == (160000.0, 10000.0)


def test_a_config_json_without_rope_settings_takes_transformers_defaults(tmp_path):
    """No theta named anywhere: transformers' own defaults for both kinds of layer."""
    ModernBERT(tiny(local_attention=4, global_attn_every_n_layers=2, global_rope_theta=160000.0,
                    local_rope_theta=10000.0)).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    for key in ("global_rope_theta", "local_rope_theta", "rope_parameters"):
        conf.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    defaults = transformers.ModernBertConfig().rope_parameters
    loaded = ModernBERT.from_pretrained(tmp_path).config
    assert (loaded.global_rope_theta, loaded.local_rope_theta) == (defaults["full_attention"]["rope_theta"],
                                                                   defaults["sliding_attention"]["rope_theta"])


def test_dropout_where_transformers_has_it(tmp_path):
    """Each dropout setting in the module transformers applies it in (same names), attention dropout off in eval
    (eval logits equal transformers' with every dropout set), and config.json's bos/eos ids the <CLS>/<SEP> ids,
    as transformers' own ModernBertConfig defaults pair them."""
    p = dict(embedding_dropout=0.1, attention_dropout=0.2, mlp_dropout=0.3, classifier_dropout=0.4)
    cfg = tiny(local_attention=4, num_labels=3, **p)
    torch.manual_seed(0)
    ours = randomize(ModernBertForSequenceClassification(cfg), 0)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    rates = lambda m: {n: x.p for n, x in m.named_modules() if isinstance(x, torch.nn.Dropout)}  # noqa: E731
    assert rates(ours) == rates(theirs) and set(rates(ours).values()) == set(p.values())
    assert [a.dropout for a in (layer.attn for layer in ours.model.layers)] == \
        [a.attention_dropout for a in (layer.attn for layer in theirs.model.layers)] == [0.2] * 4
    ids, mask = batch(cfg.vocab_size, [17, 3, 40], seed=2)
    with torch.no_grad():
        assert (ours.eval()(ids, mask)[0] - theirs.eval()(input_ids=ids, attention_mask=mask).logits).abs().max() <= TOL
    conf, default = json.loads((tmp_path / "config.json").read_text()), transformers.ModernBertConfig()
    assert (default.bos_token_id, default.eos_token_id) == (default.cls_token_id, default.sep_token_id)
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (cfg.cls_token_id, cfg.sep_token_id)


def test_packed_equals_padded_and_gradients_match_hf(tmp_path):
    cfg = tiny(local_attention=6, global_attn_every_n_layers=2)
    torch.manual_seed(0)
    ours = randomize(ModernBERT(cfg), 0)
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    ids, mask = batch(cfg.vocab_size, [23, 5, 61, 1], seed=3)
    labels = torch.full_like(ids, -100)
    g = torch.Generator().manual_seed(1)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    labels[pick] = torch.randint(0, cfg.vocab_size, (int(pick.sum()),), generator=g)

    # packed input: the same tokens laid end to end
    real = mask.bool()
    lengths = mask.sum(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    logits_packed, loss_packed = ours(ids[real], labels=labels[real], cu_seqlens=cu, max_seqlen=int(lengths.max()))
    logits_padded, loss_padded = ours(ids, mask, labels=labels)
    # padded input is unpadded before the embeddings, so both run the very same computation
    assert torch.equal(logits_packed, logits_padded) and torch.equal(loss_packed, loss_padded)
    full_packed, _ = ours(ids[real], cu_seqlens=cu)
    full_padded, _ = ours(ids, mask)
    assert torch.equal(full_packed, full_padded[real])

    # gradients of the unpadded path against transformers' padded model
    loss_padded.backward()
    hf_loss = F.cross_entropy(hf(input_ids=ids, attention_mask=mask).logits[pick], labels[pick])
    hf_loss.backward()
    assert abs(loss_padded.item() - hf_loss.item()) < 1e-5
    ref = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - ref[name].grad).abs().max() <= 1e-5 * max(1.0, ref[name].grad.abs().max().item()), name


def test_sparse_prediction_loss_equals_full_logits_loss():
    cfg = tiny()
    torch.manual_seed(0)
    model = ModernBERT(cfg).eval()
    ids, mask = batch(cfg.vocab_size, [30, 12, 44], seed=5)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 11], labels[2, 0], labels[2, 43] = 8, 9, 10, 11
    with torch.no_grad():
        sparse_logits, loss = model(ids, mask, labels=labels)
        full, _ = model(ids, mask)
    sel = labels != -100
    assert sparse_logits.shape == (4, cfg.vocab_size)
    assert torch.allclose(sparse_logits, full[sel], atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(full[sel], labels[sel]), atol=1e-6)


def test_local_attention_window_is_inclusive():
    """Key at distance exactly w is seen, w + 1 is not: perturbing v at distance w + 1 changes nothing. In fp64,
    so that the comparison with dense attention checks the mask alone, with rounding far below any mask error."""
    from model import Packing, attention
    torch.manual_seed(0)
    w, T = 3, 20
    q, k, v = (torch.randn(T, 2, 8, dtype=torch.float64) for _ in range(3))
    packing = Packing(torch.tensor([0, T], dtype=torch.int32), T, T)
    base = attention(q, k, v, packing, window=w)
    v2 = v.clone(); v2[10 + w + 1] += 1.0; v2[10 - w - 1] += 1.0
    assert torch.equal(attention(q, k, v2, packing, window=w)[10], base[10])
    v3 = v.clone(); v3[10 + w] += 1.0
    assert not torch.allclose(attention(q, k, v3, packing, window=w)[10], base[10])
    # and it equals dense attention with an explicit |i - j| <= w mask
    i = torch.arange(T)
    allowed = (i[:, None] - i[None, :]).abs() <= w
    s = torch.einsum("qhd,khd->hqk", q, k) / 8 ** 0.5
    dense = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    assert torch.allclose(base, dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_sequence_classification_matches_hf_both_ways(tmp_path, pooling, num_labels):
    cfg = tiny(local_attention=4, classifier_pooling=pooling, num_labels=num_labels)
    torch.manual_seed(1)
    ours = randomize(ModernBertForSequenceClassification(cfg), 1).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert hf.config.classifier_pooling == pooling and hf.num_labels == num_labels
    ids, mask = batch(cfg.vocab_size, [17, 3, 40], seed=2)
    labels = torch.tensor([0.5, -1.0, 2.0]) if num_labels == 1 else torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert (ours(ids, mask)[0] - hf(input_ids=ids, attention_mask=mask).logits).abs().max() <= TOL
        loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss  # MSE for one label, else cross-entropy
        assert ours(ids, mask, labels=labels)[1] == pytest.approx(loss.item(), rel=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    back = ModernBertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(ids, mask)[0] - hf(input_ids=ids, attention_mask=mask).logits).abs().max() <= TOL


def test_from_mlm_and_encode(tmp_path):
    cfg = tiny()
    torch.manual_seed(2)
    mlm = randomize(ModernBERT(cfg), 2).eval()
    clf = ModernBertForSequenceClassification.from_mlm(mlm, num_labels=1, pooling="mean").eval()
    assert torch.equal(clf.model.embeddings.tok_embeddings.weight, mlm.model.embeddings.tok_embeddings.weight)
    mlm.save_pretrained(tmp_path)
    hf_base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    hf_mlm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = batch(cfg.vocab_size, [8, 30, 1], seed=4)
    with torch.no_grad():
        h = hf_base(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert (mlm.encode(ids, mask) - ref).abs().max() <= TOL
        # the classifier: mean pooling, the MLM's own head (dense, GELU, norm), then its fresh linear layer
        expected = clf.classifier(hf_mlm.head(ref))
        assert (clf(ids, mask)[0] - expected).abs().max() <= TOL


def test_loading_errors_name_file_and_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        ModernBERT.from_pretrained(tmp_path / "missing")
    cfg = tiny()
    ModernBERT(cfg).save_pretrained(tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**conf, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'bert'"):
        ModernBERT.from_pretrained(tmp_path / "bert")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "hidden_activation": "silu"}))
    with pytest.raises(ValueError, match="hidden_activation"):
        ModernBERT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.Wi\.weight' has shape \(192, 64\)"):
        ModernBERT.from_pretrained(tmp_path / "m")
    # what no tensor's shape shows (heads, window, ...) is checked against the weights' own record of it
    for key, value in (("num_attention_heads", 2), ("local_attention", 64), ("norm_eps", 1e-6)):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, key: value}))
        with pytest.raises(ValueError, match=rf"config\.json: {key} = {value}, but the weights in model\.safetensors "
                                             rf"were trained with {getattr(cfg, key)}"):
            ModernBERT.from_pretrained(tmp_path / "m")
    # config.json's layer_types cannot tell every 2 from every 3 layers in a 2-layer model: not a contradiction
    ModernBERT(tiny(num_hidden_layers=2, global_attn_every_n_layers=3)).save_pretrained(tmp_path / "two")
    ModernBERT.from_pretrained(tmp_path / "two")
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    # a setting the caller asks for is theirs to choose (e.g. a longer window at inference)
    chosen = ModernBERT.from_pretrained(tmp_path / "m", local_attention=64, norm_eps=1e-6).config
    assert (chosen.local_attention, chosen.norm_eps) == (64, 1e-6)
    with pytest.raises(ValueError, match="no tensor 'classifier.weight'"):
        ModernBertForSequenceClassification.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable"):
        ModernBERT.from_pretrained(tmp_path / "m")


def test_init_optimizer_groups_and_flops():
    cfg = tiny(num_hidden_layers=8, hidden_size=256, intermediate_size=384, vocab_size=5000)
    torch.manual_seed(0)
    model = ModernBERT(cfg)
    std_out = 0.02 / (2 * 8) ** 0.5
    for w, std in [(model.model.embeddings.tok_embeddings.weight, 0.02), (model.model.layers[1].attn.Wqkv.weight, 0.02),
                   (model.model.layers[3].mlp.Wo.weight, std_out), (model.head.dense.weight, std_out)]:
        assert abs(w.std().item() / std - 0.88) < 0.05  # a normal truncated at 2 std has std 0.88 sigma
        assert w.abs().max() <= 2 * std
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    assert (model.decoder.bias == 0).all() and (model.model.final_norm.weight == 1).all()

    # the classifier: std hidden_size ** -0.5, so 0.88 of it after truncation at 2 std (written out below); a
    # sample std of n = 16,384 weights has a relative standard error of at most 1 / sqrt(2 n): allow 5 of them
    H, labels = 512, 32
    clf = ModernBertForSequenceClassification(tiny(num_hidden_layers=1, hidden_size=H, intermediate_size=64,
                                                   num_labels=labels))
    phi, mass = math.exp(-2.0) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    expected = H ** -0.5 * math.sqrt(1 - 2 * 2 * phi / mass)
    assert abs(clf.classifier.weight.std().item() / expected - 1) < 5 / math.sqrt(2 * H * labels)
    assert clf.classifier.weight.abs().max() <= 2 * H ** -0.5 and (clf.classifier.bias == 0).all()

    opt = model.configure_optimizers(weight_decay=1e-5, learning_rate=1e-3, betas=(0.9, 0.98))
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith(("Wqkv.weight", "Wo.weight", "Wi.weight", "dense.weight")) for i in decay)
    assert all("norm" in names[i] or "bias" in names[i] or "tok_embeddings" in names[i] for i in no_decay)
    assert len(decay) + len(no_decay) == len(names)

    for s in (1, 5, 64, 129, 300):
        for w in (None, 1, 64):
            i = torch.arange(s)
            brute = s * s if w is None else int(((i[:, None] - i[None, :]).abs() <= w).sum())
            assert visible_keys(s, w) == brute


def test_flops_per_token_counts_what_runs():
    """MFU's numerator. Against torch's own FLOP counter on a model with global layers only (the counter
    sees every matmul, including the SDPA products), then by hand for the window's share."""
    seqlens, predicted = [7, 30, 12], [0, 5, 20, 40]
    cu = torch.tensor([0, 7, 37, 49], dtype=torch.int32)
    ids = torch.randint(7, 300, (49,), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[predicted] = ids[predicted]
    for with_labels in (True, False):
        net = ModernBERT(tiny(vocab_size=300, num_hidden_layers=3, global_attn_every_n_layers=1))
        with FlopCounterMode(display=False) as counter:
            net(ids, labels=labels if with_labels else None, cu_seqlens=cu, max_seqlen=30)
        n_predicted = len(predicted) if with_labels else 49
        assert round(net.flops_per_token(seqlens, n_predicted) * 49) == counter.get_total_flops()

    # H 64, I 96, V 300, 3 layers with window 4 on layers 1 and 2: per token 2 * (3HH + HH + 2HI + IH)
    # per layer; the head and decoder 2 * (HH + HV) per predicted token; 4 H per visible (query, key) pair
    net = ModernBERT(tiny(vocab_size=300, num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=8))
    linear = 3 * 2 * (4 * 64 * 64 + 3 * 64 * 96) * 49 + 2 * (64 * 64 + 64 * 300) * 4
    full = 7 * 7 + 30 * 30 + 12 * 12
    windowed = (49 - 6) + (30 * 9 - 2 * 10) + (12 * 9 - 2 * 10)  # 7 tokens: 6 pairs are 5 or 6 apart; longer
    # ones: 9 keys per query, less 4 + 3 + 2 + 1 at each end
    assert round(net.flops_per_token(seqlens, 4) * 49) == linear + 4 * 64 * (full + 2 * windowed)


def test_mfu_is_a_training_steps_flops_over_time_and_peak():
    """estimate_mfu = FLOPs of a training step (forward + backward, 3 forwards, as torch's FLOP counter measures
    them on a model with global layers only) / seconds / peak FLOP/s."""
    seqlens = [7, 30, 12]
    cu = torch.tensor([0, 7, 37, 49], dtype=torch.int32)
    ids = torch.randint(7, 300, (49,), generator=torch.Generator().manual_seed(0))
    net = ModernBERT(tiny(vocab_size=300, num_hidden_layers=3, global_attn_every_n_layers=1))
    with FlopCounterMode(display=False) as forward:
        logits, _ = net(ids, cu_seqlens=cu, max_seqlen=30)
    with FlopCounterMode(display=False) as backward:
        logits.sum().backward()
    assert backward.get_total_flops() == 2 * forward.get_total_flops()
    step, seconds, peak = 3 * forward.get_total_flops(), 0.25, 1e9
    assert net.estimate_mfu(seqlens, 49, seconds, peak) == pytest.approx(step / seconds / peak, rel=1e-9)


def test_cpu_path_never_imports_triton():
    code = ("import sys, torch; from model import ModernBERT, ModernBertConfig; "
            "m = ModernBERT(ModernBertConfig.preset('tiny', vocab_size=100, local_attention=4)); "
            "m(torch.randint(0, 100, (2, 20)))[0].sum().backward(); "
            "assert not any(k == 'triton' or k.startswith(('triton.', 'modernbert_kernels')) for k in sys.modules), 'triton imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
