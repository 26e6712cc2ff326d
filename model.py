"""
ModernBERT in one file: the architecture of Hugging Face's ModernBertForMaskedLM, computed on packed tokens.

The model never sees padding. Every forward runs on a packed batch: `input_ids` of shape (total_tokens,)
plus `cu_seqlens` (int32, (n_seqs + 1,), cumulative sequence lengths) and `max_seqlen`. Padded (B, S)
input with an attention mask is unpacked before the embeddings and outputs are re-padded only where the
caller asks for them. Attention is one function, `attention()`: on CUDA our Triton kernels (modernbert_kernels/),
elsewhere a plain PyTorch reference. MODERNBERT_ATTENTION (or `model.ATTENTION`) switches: `auto` (that
default), `reference` (the reference everywhere) or `kernels` (the kernels everywhere; on a CPU only with
TRITON_INTERPRET=1, which is how the tests run the model on them without a GPU).

State-dict keys and config.json are Hugging Face's, so `from_pretrained` / `save_pretrained` interoperate
with transformers without importing it. At the end: texts in packed batches by a token budget, their embeddings
and retrieval scored by them, which evaluate.py and train.py's in-training evaluation share.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = os.environ.get("MODERNBERT_ATTENTION", "auto")
if ATTENTION not in ("auto", "reference", "kernels"):
    raise ValueError(f"MODERNBERT_ATTENTION must be auto, reference or kernels, got {ATTENTION!r}")
IGNORE_INDEX = -100
# bf16 dense peak FLOP/s per GPU, for MFU; other devices have none
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# -----------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModernBertConfig:
    vocab_size: int = 99574
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    local_attention: int = 128  # total window: query i sees key j iff |i - j| <= local_attention // 2
    global_attn_every_n_layers: int = 3  # layer i is global iff i % n == 0
    global_rope_theta: float = 10000.0
    local_rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    pad_token_id: int = 4
    cls_token_id: int = 5
    sep_token_id: int = 6
    mask_token_id: int = 3
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    classifier_dropout: float = 0.0
    classifier_pooling: str = "cls"  # "cls" or "mean", for sequence classification
    num_labels: int = 2  # sequence classification: 1 = regression, C = classes
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0

    def __post_init__(self):
        """Impossible values stop here, with a ValueError naming the field."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise ValueError(f"{f.name} = {value!r} is not a{'n' if kind is int else ''} {kind.__name__}")
            if kind is not str and value < 0 or kind is int and value == 0 and not f.name.endswith("_id"):
                raise ValueError(f"{f.name} = {value!r} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads = {self.num_attention_heads} does not divide "
                             f"hidden_size = {self.hidden_size}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling = {self.classifier_pooling!r} is not 'cls' or 'mean'")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def is_global(self, layer):
        return layer % self.global_attn_every_n_layers == 0

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # llm-jp/llm-jp-modernbert-base: ~187M parameters, 76.5M of them in the embedding
    "llm-jp-modernbert-base": dict(vocab_size=99574, global_rope_theta=10000.0, local_rope_theta=10000.0,
                                   pad_token_id=4, cls_token_id=5, sep_token_id=6, mask_token_id=3),
    # answerdotai/ModernBERT-base (English)
    "modernbert-base": dict(vocab_size=50368, global_rope_theta=160000.0, local_rope_theta=10000.0,
                            pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, mask_token_id=50284),
    # a few-million-parameter model for the CPU demo and tests; vocab_size follows the demo tokenizer
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=8192),
}


def gpu_peak_flops(device):
    """PEAK_FLOPS of a device's GPU, or None (a CPU, or a GPU not in the table)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def cpu_threads(local_world=1):
    """Threads for CPU work, when OMP_NUM_THREADS does not say: the cores of this process's share of the machine,
    less one. OpenMP threads wait for each other, so one descheduled thread stalls the rest: on 2 cores, 2
    threads ran 1.5x faster than 1 when idle, but 2x slower beside one busy process and up to 20x under
    heavier load. Leave a core free."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world - 1))


# -----------------------------------------------------------------------------------------------------------
# packing: padded (B, S) <-> packed (total_tokens,)


def unpad(attention_mask):
    """-> (indices of real tokens in the flattened (B*S,) batch, cu_seqlens int32 (B+1,), max_seqlen)."""
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def repad(x, indices, batch, seqlen):
    """(total_tokens, ...) -> (batch, seqlen, ...), zeros where the mask was 0."""
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


class Packing:
    """Where every sequence lies in a packed batch; built once per forward and shared by all layers."""

    def __init__(self, cu_seqlens, max_seqlen, total):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.max_seqlen = int(max_seqlen)
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        self.seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                               output_size=total)  # (total_tokens,)
        self.positions = torch.arange(total, device=lengths.device) - self.cu_seqlens[:-1].long()[self.seq_ids]
        self.lengths = lengths
        self._cache = {}  # derived tensors of the reference attention, keyed by what they depend on

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]


# -----------------------------------------------------------------------------------------------------------
# rotary embedding and attention


def rope_cos_sin(positions, head_dim, theta, dtype):
    """NeoX RoPE tables gathered per token: (total_tokens, head_dim) each, computed as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def use_kernels(x):
    """Whether attention and RoPE on tensor x run in the Triton kernels (see ATTENTION at the top)."""
    if ATTENTION == "kernels" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("MODERNBERT_ATTENTION=kernels on CPU tensors needs TRITON_INTERPRET=1 (Triton's "
                           "interpreter; the kernels compile for CUDA GPUs only)")
    return ATTENTION == "kernels" or (ATTENTION == "auto" and x.is_cuda)


def apply_rotary(q, k, cos, sin):
    """q, k (total_tokens, n_heads, head_dim); cos, sin (total_tokens, head_dim). Rotation in fp32."""
    if use_kernels(q):
        from modernbert_kernels import apply_rotary as apply_rotary_kernel
        return apply_rotary_kernel(q, k, cos, sin)
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
    q_rot = q.float() * cos + rotate_half(q.float()) * sin
    k_rot = k.float() * cos + rotate_half(k.float()) * sin
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


def attention(q, k, v, packing, window=None, dropout_p=0.0):
    """Bidirectional attention inside each packed sequence; with `window`, query i sees key j iff |i-j| <= window.
    q, k, v (total_tokens, n_heads, head_dim) -> (total_tokens, n_heads, head_dim)."""
    if use_kernels(q) and dropout_p == 0.0:
        from modernbert_kernels import flash_attn_varlen, work_table
        table = packing.cached("work_table", lambda: work_table(packing.cu_seqlens, q.shape[0]))  # one per forward
        return flash_attn_varlen(q, k, v, packing.cu_seqlens, packing.max_seqlen, window=window, table=table)
    if window is None or window >= packing.max_seqlen - 1:  # no pair of tokens is farther apart than the window
        return _global_attention_reference(q, k, v, packing, dropout_p)
    return _local_attention_reference(q, k, v, packing, window, dropout_p)


def _global_attention_reference(q, k, v, packing, dropout_p):
    # one SDPA call per sequence: no padding and no mask
    out = torch.empty_like(q)
    bounds = packing.cached("bounds", lambda: packing.cu_seqlens.tolist())
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (n_heads, seqlen, head_dim)
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p).transpose(0, 1)
    return out


def _local_attention_reference(q, k, v, packing, window, dropout_p, block=128):
    # The packed stream is cut into query blocks of `block` tokens; each block attends to the keys in
    # [block start - window, block end + window] of the stream, masked to its own sequence and window.
    # Cost and memory grow with tokens x (block + 2 window), never with sequence length squared.
    total, n_heads, head_dim = q.shape
    n_blocks = -(-total // block)
    span = block + 2 * window
    padded = n_blocks * block
    mask = packing.cached(("band", window, block), lambda: _band_mask(packing, window, block, n_blocks))
    qb = F.pad(q, (0, 0, 0, 0, 0, padded - total)).view(n_blocks, block, n_heads, head_dim)
    kb, vb = (F.pad(t, (0, 0, 0, 0, window, padded - total + window)).unfold(0, span, block) for t in (k, v))
    # qb (n_blocks, block, n_heads, head_dim); kb, vb (n_blocks, n_heads, head_dim, span)
    out = F.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(2, 3), vb.transpose(2, 3),
                                         attn_mask=mask, dropout_p=dropout_p)  # (n_blocks, n_heads, block, head_dim)
    return out.transpose(1, 2).reshape(padded, n_heads, head_dim)[:total]


def _band_mask(packing, window, block, n_blocks):
    """(n_blocks, 1, block, block + 2 window) bool: same sequence and |i - j| <= window. Positions past the
    stream get sequence id -1 so that padded query rows still see themselves (no all-masked rows)."""
    total = packing.seq_ids.numel()
    device = packing.seq_ids.device
    seq = F.pad(packing.seq_ids, (window, n_blocks * block - total + window), value=-1)
    qi = torch.arange(n_blocks, device=device)[:, None] * block + torch.arange(block, device=device)  # padded index
    kj = torch.arange(n_blocks, device=device)[:, None] * block + torch.arange(block + 2 * window, device=device)
    q_seq, k_seq = seq[qi + window], seq[kj]
    near = (qi[:, :, None] + window - kj[:, None, :]).abs() <= window
    return (near & (q_seq[:, :, None] == k_seq[:, None, :]))[:, None]


# -----------------------------------------------------------------------------------------------------------
# modules (names follow transformers' ModernBERT so checkpoints map key for key)


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids):
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.window = None if config.is_global(layer) else config.local_attention // 2
        self.theta = config.global_rope_theta if config.is_global(layer) else config.local_rope_theta
        self.dropout = config.attention_dropout
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.out_drop = nn.Dropout(config.attention_dropout)

    def forward(self, x, packing, rope):
        qkv = self.Wqkv(x).view(-1, 3, self.n_heads, self.head_dim)  # (total_tokens, 3, n_heads, head_dim)
        q, k, v = qkv.unbind(dim=1)
        q, k = apply_rotary(q, k, *rope[self.theta])
        y = attention(q, k, v, packing, self.window, self.dropout if self.training else 0.0)
        return self.out_drop(self.Wo(y.reshape(x.shape)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        input, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(F.gelu(input) * gate))


class EncoderLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        # layer 0 reads the embedding norm's output directly: no attn_norm (and no weight in checkpoints)
        self.attn_norm = nn.Identity() if layer == 0 else nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)
        self.attn = Attention(config, layer)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)
        self.mlp = MLP(config)

    def forward(self, x, packing, rope):
        x = x + self.attn(self.attn_norm(x), packing, rope)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    """transformers' ModernBertModel: embeddings, layers, final norm, on packed tokens."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)

    def forward(self, input_ids, packing):
        x = self.embeddings(input_ids)  # (total_tokens, hidden)
        thetas = {layer.attn.theta for layer in self.layers}
        rope = {t: rope_cos_sin(packing.positions, self.config.head_dim, t, x.dtype) for t in thetas}
        for layer in self.layers:
            x = layer(x, packing, rope)
        return self.final_norm(x)


class PredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x)))


# -----------------------------------------------------------------------------------------------------------
# models


class _Base(nn.Module):
    """What the MLM and classification models share: the encoder, packing of inputs, pooling, I/O, init."""
    architecture = None  # the transformers class name written to config.json

    def _packed(self, input_ids, attention_mask, cu_seqlens, max_seqlen):
        """-> (packed ids, Packing, indices or None). Accepts padded (B, S) or packed (total,) input."""
        if input_ids.dim() == 1:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, input_ids.numel()], dtype=torch.int32, device=input_ids.device)
                max_seqlen = input_ids.numel()
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            return input_ids, Packing(cu_seqlens, max_seqlen, input_ids.numel()), None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        indices, cu_seqlens, max_seqlen = unpad(attention_mask)
        return input_ids.flatten()[indices], Packing(cu_seqlens, max_seqlen, indices.numel()), indices

    @staticmethod
    def pool(h, packing, how):
        """(total_tokens, H) -> (n_seqs, H): first token ("cls") or mean over each sequence's tokens."""
        if how == "cls":
            return h[packing.cu_seqlens[:-1].long()]
        sums = h.new_zeros(len(packing.lengths), h.shape[-1]).index_add_(0, packing.seq_ids, h)
        return sums / packing.lengths.clamp(min=1)[:, None].to(h.dtype)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every tensor as ModernBERT does, all truncated normal at +-cutoff std (cutoff 2):
        - tok_embeddings, attn.Wqkv, mlp.Wi: std = initializer_range (0.02)
        - attn.Wo, mlp.Wo, head.dense: std = initializer_range / sqrt(2 * n_layers)
        - decoder.weight is tok_embeddings.weight (tied), so it keeps the embedding's init; decoder.bias = 0
        - classifier.weight: std = hidden_size ** -0.5; classifier.bias = 0
        - LayerNorm weights = 1 (none has a bias)."""
        c = self.config
        def normal(w, std):
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-c.initializer_cutoff_factor * std, b=c.initializer_cutoff_factor * std)
        std_in, std_out = c.initializer_range, c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)
        normal(self.model.embeddings.tok_embeddings.weight, std_in)
        for layer in self.model.layers:
            normal(layer.attn.Wqkv.weight, std_in)
            normal(layer.mlp.Wi.weight, std_in)
            normal(layer.attn.Wo.weight, std_out)
            normal(layer.mlp.Wo.weight, std_out)
        normal(self.head.dense.weight, std_out)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
        if hasattr(self, "decoder"):
            nn.init.zeros_(self.decoder.bias)
        if hasattr(self, "classifier"):
            normal(self.classifier.weight, c.hidden_size ** -0.5)
            nn.init.zeros_(self.classifier.bias)

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())  # parameters() counts the tied decoder weight once
        return n if embeddings else n - self.model.embeddings.tok_embeddings.weight.numel()

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps=1e-6, device_type="cpu"):
        """AdamW; weight decay only on the linear layers' weight matrices (not norms, biases or embeddings)."""
        embedding = self.model.embeddings.tok_embeddings.weight
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and p is not embedding]
        no_decay = [p for p in params if p.dim() < 2 or p is embedding]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    # ---- Hugging Face interop ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face ModernBERT directory (config.json + model.safetensors or pytorch_model.bin)."""
        config = read_hf_config(path, **overrides)
        model = cls(config)
        state = read_hf_weights(path)
        expected = {k: v for k, v in model.state_dict().items() if k != "decoder.weight"}
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"{path}: checkpoint has no tensor {missing[0]!r} needed by {cls.__name__}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                                 f"config.json implies {tuple(tensor.shape)}")
        unexpected = [k for k in state if k not in expected and k != "decoder.weight"]  # decoder.weight: tied
        if unexpected:
            raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r} for {cls.__name__}")
        saved = read_hf_metadata(path).get("architecture")
        if saved:  # what the weights' shapes cannot show (written by save_pretrained below)
            mine, chosen = shapeless(config), set(overrides)  # overrides are the caller's choice
            if chosen & {"global_attn_every_n_layers", "num_hidden_layers"}:
                chosen.add("global_layers")
            for key, value in json.loads(saved).items():
                if key in mine and key not in chosen and mine[key] != value:
                    raise ValueError(f"{os.path.join(path, 'config.json')}: {key} = {mine[key]!r}, but "
                                     f"the weights in model.safetensors were trained with {value!r}")
        model.load_state_dict({k: state[k] for k in expected}, strict=False)
        return model

    def save_pretrained(self, path):
        """Write config.json and model.safetensors that transformers' AutoModel classes load."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k != "decoder.weight"}
        tmp = os.path.join(path, "model.safetensors.tmp")
        # the settings that change the computation but no tensor's shape, so that loading can check config.json
        save_file(state, tmp, metadata={"format": "pt", "architecture": json.dumps(shapeless(self.config))})
        os.replace(tmp, os.path.join(path, "model.safetensors"))
        config = hf_config_dict(self.config, self.architecture, next(self.parameters()).dtype)
        tmp = os.path.join(path, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, os.path.join(path, "config.json"))


class ModernBERT(_Base):
    """Masked language model: encoder -> head -> decoder (tied to the embedding)."""
    architecture = "ModernBertForMaskedLM"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Encoder(config)
        self.head = PredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, labels=None, cu_seqlens=None, max_seqlen=None):
        """Padded (B, S) [+ attention_mask] or packed (total,) + cu_seqlens. Returns (logits, loss):
        with labels (IGNORE_INDEX = ignore), logits only for the labelled positions (n_labelled, V) and their mean
        cross-entropy; without, logits for every token ((B, S, V), zeros at padding, or (total, V))."""
        ids, packing, indices = self._packed(input_ids, attention_mask, cu_seqlens, max_seqlen)
        h = self.model(ids, packing)  # (total_tokens, hidden)
        if labels is None:
            logits = self.decoder(self.head(h))
            return (logits if indices is None else repad(logits, indices, *input_ids.shape)), None
        labels = labels.flatten() if indices is None else labels.flatten()[indices]
        selected = labels != IGNORE_INDEX
        logits = self.decoder(self.head(h[selected]))  # sparse prediction: the head runs on masked tokens only
        loss = F.cross_entropy(logits.float(), labels[selected]) if logits.shape[0] else logits.sum() * 0.0
        return logits, loss

    def encode(self, input_ids, attention_mask=None, cu_seqlens=None, max_seqlen=None):
        """Mean-pooled sentence embeddings (B, H) over the real tokens of each sequence (not normalised)."""
        ids, packing, _ = self._packed(input_ids, attention_mask, cu_seqlens, max_seqlen)
        return self.pool(self.model(ids, packing), packing, "mean")

    def flops_per_token(self, seqlens, n_predicted):
        """Forward FLOPs of a packed batch with these sequence lengths, divided by its token count. Matmuls
        count 2 FLOPs per multiply-add; attention counts only the keys inside each layer's window; the MLM
        head and decoder only the predicted tokens (all of them when no labels are given)."""
        c = self.config
        H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
        tokens = sum(seqlens)
        linear = c.num_hidden_layers * (3 * H * H + H * H + 2 * H * I + I * H)  # per token: Wqkv, Wo, Wi, Wo
        flops = 2 * linear * tokens + 2 * (H * H + H * V) * n_predicted  # head.dense and decoder
        for layer in self.model.layers:
            keys = sum(visible_keys(s, layer.attn.window) for s in seqlens)
            flops += 2 * 2 * H * keys  # q k^T and p v over every visible (query, key) pair
        return flops / max(tokens, 1)

    def train_flops(self, seqlens, n_predicted):
        """FLOPs of one training step on a packed batch: forward + backward = 3x forward."""
        return 3 * self.flops_per_token(seqlens, n_predicted) * sum(seqlens)

    def estimate_mfu(self, seqlens, n_predicted, seconds, peak_flops=PEAK_FLOPS["H100"]):
        """Model FLOPs utilisation of one training step."""
        return self.train_flops(seqlens, n_predicted) / seconds / peak_flops


def visible_keys(seqlen, window):
    """Number of (query, key) pairs with |i - j| <= window in one sequence (all pairs when window is None)."""
    if window is None or window >= seqlen:
        return seqlen * seqlen
    w = window
    # full rows see 2w + 1 keys; the first and last w rows lose 1..w keys each
    return seqlen * (2 * w + 1) - w * (w + 1)


class ModernBertForSequenceClassification(_Base):
    """Pooling ("cls" or "mean") -> head -> dropout -> classifier. num_labels == 1 is regression (MSE)."""
    architecture = "ModernBertForSequenceClassification"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Encoder(config)
        self.head = PredictionHead(config)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.init_weights()

    @classmethod
    def from_mlm(cls, mlm, num_labels, pooling="cls"):
        """A classifier that starts from a pretrained MLM's encoder and head, with a fresh classifier."""
        model = cls(replace(mlm.config, num_labels=num_labels, classifier_pooling=pooling))
        model.model.load_state_dict(mlm.model.state_dict())
        model.head.load_state_dict(mlm.head.state_dict())
        return model.to(next(mlm.parameters()).device)

    def forward(self, input_ids, attention_mask=None, labels=None, cu_seqlens=None, max_seqlen=None):
        """-> (logits (n_seqs, num_labels), loss or None)."""
        ids, packing, _ = self._packed(input_ids, attention_mask, cu_seqlens, max_seqlen)
        pooled = self.pool(self.model(ids, packing), packing, self.config.classifier_pooling)
        logits = self.classifier(self.drop(self.head(pooled)))
        if labels is None:
            return logits, None
        if self.config.num_labels == 1:
            return logits, F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return logits, F.cross_entropy(logits.float(), labels)


# -----------------------------------------------------------------------------------------------------------
# Hugging Face config.json and weight files

# what transformers' ModernBERT can vary that this file does not implement: (key, the only value supported)
_FIXED = {"hidden_activation": "gelu", "classifier_activation": "gelu", "norm_bias": False, "attention_bias": False,
          "mlp_bias": False, "decoder_bias": True, "classifier_bias": False}


def read_hf_config(path, **overrides):
    """config.json (either generation of transformers' keys) -> ModernBertConfig."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing (a Hugging Face model directory has config.json)")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if hf.get("model_type") != "modernbert":
        raise ValueError(f"{file}: model_type {hf.get('model_type')!r} is not 'modernbert' "
                         f"(architectures {hf.get('architectures')})")
    for key, value in _FIXED.items():
        if key in hf and hf[key] != value:
            raise ValueError(f"{file}: {key} = {hf[key]!r} is not supported (only {value!r})")
    names = {f.name for f in fields(ModernBertConfig)}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    if "layer_types" in hf and hf["layer_types"]:  # newer transformers: explicit per-layer types
        types = hf["layer_types"]
        n = next((n for n in range(1, len(types) + 1)
                  if types == ["full_attention" if i % n == 0 else "sliding_attention" for i in range(len(types))]), None)
        if n is None:
            raise ValueError(f"{file}: layer_types {types} is not 'global every n layers, from layer 0'")
        kwargs["global_attn_every_n_layers"] = n
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope:
        kwargs["global_rope_theta"] = rope["full_attention"]["rope_theta"]
        kwargs["local_rope_theta"] = rope.get("sliding_attention", {}).get("rope_theta", 10000.0)
    for key in ("full_attention", "sliding_attention"):
        if rope.get(key, {}).get("rope_type", "default") != "default":
            raise ValueError(f"{file}: rope_type {rope[key]['rope_type']!r} is not supported (only 'default')")
    kwargs.setdefault("global_rope_theta", 160000.0)  # transformers' defaults when a file names no theta
    kwargs.setdefault("local_rope_theta", 10000.0)
    if "id2label" in hf:
        kwargs["num_labels"] = len(hf["id2label"])
    if "classifier_pooling" in hf and hf["classifier_pooling"] not in ("cls", "mean"):
        raise ValueError(f"{file}: classifier_pooling {hf['classifier_pooling']!r} is not 'cls' or 'mean'")
    try:
        return ModernBertConfig(**{**kwargs, **overrides})
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def read_hf_weights(path):
    """The state dict of model.safetensors or pytorch_model.bin in `path`."""
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except Exception as e:
            raise ValueError(f"{st}: unreadable safetensors file ({e})") from None
    if os.path.isfile(pt):
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{pt}: unreadable PyTorch weights file ({e})") from None
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def shapeless(config):
    """The settings that change the computation but no tensor's shape; which layers are global as a list, since
    config.json's layer_types cannot tell every 2 from every 3 layers in a 2-layer model."""
    keys = ("num_attention_heads", "local_attention", "global_rope_theta", "local_rope_theta", "norm_eps")
    return {**{k: getattr(config, k) for k in keys},
            "global_layers": [i for i in range(config.num_hidden_layers) if config.is_global(i)]}


def read_hf_metadata(path):
    """The string metadata of model.safetensors ({} for other formats)."""
    st = os.path.join(path, "model.safetensors")
    if not os.path.isfile(st):
        return {}
    from safetensors import safe_open
    with safe_open(st, "pt") as f:
        return f.metadata() or {}


def hf_config_dict(config, architecture, dtype):
    """ModernBertConfig -> config.json contents readable by old and new transformers alike."""
    c = asdict(config)
    n_layers, every = c["num_hidden_layers"], c["global_attn_every_n_layers"]
    return {
        "architectures": [architecture], "model_type": "modernbert",
        **{k: v for k, v in c.items() if k != "num_labels"},
        **_FIXED,
        "bos_token_id": config.cls_token_id, "eos_token_id": config.sep_token_id,
        "layer_types": ["full_attention" if i % every == 0 else "sliding_attention" for i in range(n_layers)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta}},
        "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(config.num_labels)},
        "tie_word_embeddings": True,
        "dtype": str(dtype).replace("torch.", ""),
    }


# -----------------------------------------------------------------------------------------------------------
# training on several processes


def parallelize(model, mesh, dtype=torch.float32, compile=False, activation_checkpointing=False):
    """Wrap a model for training on the processes of `mesh` with FSDP2, in place: optionally compile the MLPs,
    embeddings and head (attention has its own kernels), recompute each layer in backward, then shard every
    layer and the rest. Weights, gradients and their reduction stay fp32; `dtype` is the compute dtype.
    Gradients are SUMMED across processes, not averaged: the training loss is already normalised by the whole
    global batch. That setting belongs to each FSDP module (each layer reduces its own gradients), so it is
    applied to every one of them, not only the root."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if compile:  # as ModernBERT's own training
        for module in [layer.mlp for layer in model.model.layers] + [model.model.embeddings, model.head]:
            module.compile(dynamic=True)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if activation_checkpointing:
            checkpoint(layer)
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if hasattr(model, "encode"):
        register_fsdp_forward_method(model, "encode")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


# -----------------------------------------------------------------------------------------------------------
# texts: packed batches by a token budget, embeddings, retrieval by them (evaluate.py and train.py)


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
    return torch.cat([torch.as_tensor(s) for s in seqs]).to(device), cu, int(lengths.max())


def ranks_of_gold(scores):
    """scores (n_queries, n_corpus), query i's own entry is corpus i -> its 1-based rank. Ties count against
    the query (rank = 1 + entries scoring >= its own, itself excluded), so constant scores earn nothing."""
    return (scores >= scores.diagonal()[:, None]).sum(1)  # counts the own entry itself: the + 1


def recall_mrr(scores, k=10):
    """Recall@k (share of queries whose own entry is in the top k) and MRR@k (mean 1/rank, 0 outside the top k)."""
    rank = ranks_of_gold(scores).double()
    hit = rank <= k
    return hit.double().mean().item(), torch.where(hit, 1.0 / rank, 0.0).mean().item()


@torch.no_grad()
def embed(model, tok, texts, max_len, token_budget=16384, progress=lambda batches: batches):
    """L2-normalised mean-pooled embeddings (n, H) of "<CLS> text <SEP>" (tok.encode_pair) truncated to max_len
    tokens. Texts are embedded longest first in packed batches of at most token_budget tokens; `progress` wraps
    the list of batches (evaluate.py's progress bar)."""
    device = next(model.parameters()).device
    seqs = [torch.tensor(tok.encode_pair(t, max_len=max_len)) for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), model.config.hidden_size)
    for group in progress(list(by_budget([len(seqs[i]) for i in order], token_budget))):
        idx = [order[i] for i in group]
        ids, cu, m = pack([seqs[i] for i in idx], device)
        out[idx] = F.normalize(model.encode(ids, cu_seqlens=cu, max_seqlen=m).float(), dim=-1).cpu()
    return out
