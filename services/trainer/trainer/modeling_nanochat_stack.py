"""
Our GPT (trainer/gpt.py) for Hugging Face transformers ≥ 5, shipped inside an export whose model its
built-in NanoChat class cannot compute (value embeddings, smear, backout, sliding windows, per-layer
scalars, a QK scale): `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

This file is copied into the export as it is and imports only torch and transformers. It computes what
gpt.py computes, in the same parameter names (so the export's weights are our checkpoint's), with the KV
cache transformers' generate() passes in; the smear's previous-token embedding rides on that cache.
Attention is PyTorch SDPA with an explicit causal-window mask; positions past `sequence_len` keep the
sliding windows the model was trained with.
"""

import dataclasses
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

GATE_CHANNELS_VE = 12  # value-embedding gates read the first 12 channels of the residual
GATE_CHANNELS_SMEAR = 24  # the smear gate reads the first 24 channels of the embedding
# transformers 5 names the cache `cache` in outputs (earlier: `past_key_values`)
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else ("past_key_values")
)


class NanoChatStackConfig(PreTrainedConfig):
    model_type = "nanochat_stack"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    rope_base: float = 100_000.0
    softcap: float = 15.0
    qk_scale: float = 1.2
    value_embeds: bool = True
    smear: bool = True
    backout: bool = True
    layer_scalars: bool = True
    norm_eps: float | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    def window_sizes(self) -> list[int]:
        """Earlier keys each layer's queries see: L = the context length, S = ¼ of it (multiple of 128)."""
        short = -(-self.sequence_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [
            self.sequence_len if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)
        ]
        sizes[-1] = self.sequence_len
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        return self.value_embeds and (self.n_layer - 1 - layer) % 2 == 0


def norm(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanoChatStackConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.config = layer, config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = linear(config.n_embd, config.n_head * self.head_dim)
        self.c_k = linear(config.n_embd, config.n_kv_head * self.head_dim)
        self.c_v = linear(config.n_embd, config.n_kv_head * self.head_dim)
        self.c_proj = linear(config.n_head * self.head_dim, config.n_embd)
        self.ve_gate = linear(GATE_CHANNELS_VE, config.n_kv_head) if config.has_value_embed(layer) else None

    def forward(self, x, value_embed, cos, sin, mask, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :GATE_CHANNELS_VE]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        eps, scale = self.config.norm_eps, self.config.qk_scale
        q, k = norm(q, eps) * scale, norm(k, eps) * scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: NanoChatStackConfig) -> None:
        super().__init__()
        self.c_fc = linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: NanoChatStackConfig, layer: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)
        self.eps = config.norm_eps

    def forward(self, x, value_embed, cos, sin, mask, cache) -> torch.Tensor:
        x = x + self.attn(norm(x, self.eps), value_embed, cos, sin, mask, cache)
        return x + self.mlp(norm(x, self.eps))


class NanoChatStackForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatStackConfig
    base_model_prefix = ""
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: NanoChatStackConfig) -> None:
        super().__init__(config)
        vocab, n_layer = config.padded_vocab_size, config.n_layer
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(vocab, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(n_layer))
        self.lm_head = linear(config.n_embd, vocab)
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, kv_dim) for i in range(n_layer) if config.has_value_embed(i)}
        )
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer)) if config.layer_scalars else None
        self.x0_lambdas = nn.Parameter(torch.zeros(n_layer)) if config.layer_scalars else None
        self.smear_gate = linear(GATE_CHANNELS_SMEAR, 1) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_layer = n_layer // 2 if config.backout else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of (B, T, 1, head_dim/2) for integer positions (B, T), computed as gpt.py's tables."""
        head_dim = self.config.head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
        angles = positions.float()[..., None] * self.config.rope_base ** (-exponents)
        return angles.cos()[:, :, None, :].to(dtype), angles.sin()[:, :, None, :].to(dtype)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        slots = torch.arange(past, past + T, device=input_ids.device)  # where the new keys go
        if position_ids is None:
            position_ids = slots[None].expand(B, T)
        dtype = self.wte.weight.dtype
        cos, sin = self.rotary(position_ids, dtype)
        masks = self.attention_masks(slots, past + T, attention_mask)

        eps = self.config.norm_eps
        x = norm(self.wte(input_ids), eps)
        if self.smear_gate is not None:
            previous = getattr(cache, "smear_previous", None) if past else None
            if cache is not None:  # the embedding before smearing, as the next step's "previous"
                cache.smear_previous = x[:, -1:]
            x = self.smear(x, previous)
        x0, halfway = x, None
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = (self.resid_lambdas[i] * x.float() + self.x0_lambdas[i] * x0.float()).to(dtype)
            value_embed = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, value_embed, cos, sin, masks[i], cache)
            if i == self.backout_layer:
                halfway = x
        if halfway is not None:
            x = x - self.backout_lambda * halfway
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(norm(x, eps)).float()[..., : self.config.vocab_size]
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def attention_masks(
        self, slots: torch.Tensor, total: int, attention_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Per layer, (B or 1, 1, T, total) booleans: causal, within the layer's window, not padding. A
        padding query still sees its own key: a row with nothing to attend would turn to NaN and spread."""
        keys = torch.arange(total, device=slots.device)
        distance = (slots[:, None] - keys[None, :])[None, None]
        padding = attention_mask[:, None, None, -total:].bool() if attention_mask is not None else None
        masks = {}
        for window in set(self.config.window_sizes()):
            mask = (distance >= 0) & (distance <= window)
            masks[window] = mask if padding is None else (mask & padding) | (distance == 0)
        return [masks[w] for w in self.config.window_sizes()]

    def smear(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        before = torch.cat(
            [previous if previous is not None else torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1
        )
        gate = torch.sigmoid(self.smear_gate(x[..., :GATE_CHANNELS_SMEAR]))
        return x + self.smear_lambda * gate * before
