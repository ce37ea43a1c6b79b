"""
The GPT: a decoder-only Transformer in the shape of nanochat's recipe (../shared/RECIPE.md).

    tokens ─ wte ─ norm ─ smear ─┬─ x0 ───────────────────────────────┐
                                 └─ for each layer: x = resid_λ·x + x0_λ·x0
                                                    x = x + attn(norm(x), value embedding)
                                                    x = x + mlp(norm(x))
                                    x = x − backout_λ·(x out of block index n_layer//2)
                                    norm ─ lm_head ─ fp32: 15·tanh(z/15) ─ logits

- rotary positions (base 100k), no learned positions; QK-norm after rotary, then q, k ×1.2;
- parameter-free RMSNorm everywhere; ReLU² MLP (4×); no biases; untied embedding and lm_head;
- sliding-window attention tiled from a pattern (`SSSL`: three ¼-context layers, one full; the last
  layer is always full); grouped-query attention when n_kv_head < n_head;
- value embeddings on alternating layers, added to v through a per-KV-head gate;
- smear: each position mixes in a gated share of the previous token's embedding.

Mixed precision is explicit: weights are fp32 masters, cast to the compute dtype in each matmul
(`Linear`, the lm_head included), embeddings are stored in the compute dtype (fp32 under fp16, for
the grad scaler), and the logits are soft-capped and scored in fp32.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.attention import attention

GATE_CHANNELS_VE = 12  # value-embedding gates read the first 12 channels of the residual
GATE_CHANNELS_SMEAR = 24  # the smear gate reads the first 24 channels of the embedding


@dataclass
class GPTConfig:
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
    layer_scalars: bool = True  # learned resid_λ and x0_λ; off: x = x (the older nanochat's residual)
    norm_eps: float | None = None  # RMSNorm's ε; None: the dtype's machine epsilon (torch's default)

    def __post_init__(self) -> None:
        assert self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head"
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert self.window_pattern and set(self.window_pattern.upper()) <= {"S", "L"}, "use only S and L"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Embedding/lm_head rows rounded up to a multiple of 64 (tensor cores); logits are cropped back."""
        return -(-self.vocab_size // 64) * 64

    def window_sizes(self) -> list[int]:
        """Earlier tokens each layer's queries see besides their own (the reference's left window):
        L = the context length, S = ¼ of it rounded up to a multiple of 128."""
        short = -(-self.sequence_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [
            self.sequence_len if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)
        ]
        sizes[-1] = self.sequence_len
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        """Alternating layers, counted from the last (which always has one)."""
        return self.value_embeds and (self.n_layer - 1 - layer) % 2 == 0

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class Linear(nn.Linear):
    """Bias-free linear layer: the fp32 master weight is cast to the input's dtype (no autocast)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) by position-dependent angles; x is (B, T, heads, head_dim)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.config = layer, config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_proj = Linear(config.n_head * config.head_dim, config.n_embd)
        self.ve_gate = Linear(GATE_CHANNELS_VE, config.n_kv_head) if config.has_value_embed(layer) else None

    def forward(self, x, value_embed, cos, sin, window, kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:  # ResFormer-style value residual, gated per KV head in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :GATE_CHANNELS_VE]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        eps, scale = self.config.norm_eps, self.config.qk_scale
        q, k = norm(q, eps) * scale, norm(k, eps) * scale
        if kv_cache is None:
            y = attention(q, k, v, window)
        else:
            k, v = kv_cache.store(self.layer, k, v)  # all keys/values so far, this step's included
            y = attention(q, k, v, window, kv_cache.positions)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)
        self.eps = config.norm_eps

    def forward(self, x, value_embed, cos, sin, window, kv_cache=None) -> torch.Tensor:
        x = x + self.attn(norm(x, self.eps), value_embed, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        vocab, n_layer = config.padded_vocab_size, config.n_layer
        self.wte = nn.Embedding(vocab, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(n_layer))
        self.lm_head = Linear(config.n_embd, vocab)
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, kv_dim) for i in range(n_layer) if config.has_value_embed(i)}
        )
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer)) if config.layer_scalars else None
        self.x0_lambdas = nn.Parameter(torch.zeros(n_layer)) if config.layer_scalars else None
        self.smear_gate = Linear(GATE_CHANNELS_SMEAR, 1) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        # The residual coming out of block index n_layer//2 is subtracted back out before the head.
        self.backout_layer = n_layer // 2 if config.backout else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.compute_dtype = torch.float32
        self.window_sizes = config.window_sizes()
        # Room to sample and score well past the training length: 10× the context, as the reference.
        self.rotary_len = config.sequence_len * 10
        cos, sin = self.rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # -- initialisation --------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """The recipe's initialisation; call once after construction (seed torch first)."""
        width = self.config.n_embd
        bound = math.sqrt(3) / math.sqrt(width)  # U(±bound) has std 1/√width
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        if self.config.layer_scalars:
            n_layer = self.config.n_layer
            self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, n_layer))
            self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, n_layer))
        if self.smear_gate is not None:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Activations, rotary tables and embeddings in `dtype`; all other weights stay fp32 masters.
        Under fp16 the embeddings stay fp32 too: a grad scaler refuses to unscale fp16 gradients."""
        self.compute_dtype = dtype
        embedding_dtype = torch.float32 if dtype == torch.float16 else dtype
        self.wte.to(embedding_dtype)
        self.value_embeds.to(embedding_dtype)
        self.set_rotary_len(self.rotary_len)

    def set_rotary_len(self, length: int) -> None:
        """Rotary tables for `length` positions, in the compute dtype (a longer table keeps every row)."""
        self.rotary_len = length
        cos, sin = self.rotary_tables(length)
        self.cos, self.sin = cos.to(self.compute_dtype), sin.to(self.compute_dtype)

    def rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.head_dim
        inv_freq = self.config.rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq).to(self.wte.weight.device)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, head_dim/2)

    # -- accounting --------------------------------------------------------------------

    def matrix_params(self) -> list[nn.Parameter]:
        """The 2-D hidden matrices (Muon's share)."""
        return [p for p in self.blocks.parameters() if p.ndim == 2]

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head: the N of the tokens:params ratio."""
        return sum(p.numel() for p in self.matrix_params()) + self.lm_head.weight.numel()

    def estimate_flops(self) -> int:
        """FLOPs per token of a training step: 6·(matmul params) + attention's 12·heads·head_dim·window."""
        matmul = sum(p.numel() for p in self.matrix_params()) + self.lm_head.weight.numel()
        if self.smear_gate is not None:
            matmul += self.smear_gate.weight.numel()
        c = self.config
        attention_flops = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in self.window_sizes)
        return 6 * matmul + attention_flops

    # -- forward ---------------------------------------------------------------------

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or with targets the cross-entropy loss (ignore index −1)."""
        T = idx.size(1)
        if kv_cache is None:
            if self.rotary_len < T:  # a long CORE prompt to a small-context model; the reference stops here
                self.set_rotary_len(T)
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:  # each row continues from its own length
            positions = kv_cache.start(T)
            assert kv_cache.end <= self.rotary_len, (
                f"sequence of {kv_cache.end} tokens exceeds {self.rotary_len}"
            )
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, head_dim/2)

        eps = self.config.norm_eps
        x = self.embed(idx)
        if self.smear_gate is not None:
            previous = kv_cache.swap_last_embedding(x) if kv_cache is not None else None
            x = self.smear(x, previous)
        x0 = x
        dtype = x.dtype
        halfway = None
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                # In fp32, rounded once (as a fused kernel does): rounding λ to bf16 first would hide its
                # small learned steps (bf16 spacing near 1 is 0.008; resid_λ's LR is ~0.0004 per step).
                x = (self.resid_lambdas[i] * x.float() + self.x0_lambdas[i] * x0.float()).to(dtype)
            value_embed = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, value_embed, cos, sin, self.window_sizes[i], kv_cache)
            if i == self.backout_layer:
                halfway = x
        if halfway is not None:
            x = x - self.backout_lambda.to(dtype) * halfway
        if kv_cache is not None:
            kv_cache.advance()

        logits = self.lm_head(norm(x, eps)).float()[..., : self.config.vocab_size]
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        targets = targets.reshape(-1)
        reduction = "sum" if loss_reduction == "mean" else loss_reduction
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets, ignore_index=-1, reduction=reduction
        )
        if loss_reduction == "mean":  # over the scored targets; a batch with none (SFT) scores 0, not NaN
            loss = loss / (targets != -1).sum().clamp(min=1)
        return loss

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The normed token embeddings: what smear mixes forward (a KV cache keeps each row's last)."""
        return norm(self.wte(idx).to(self.compute_dtype), self.config.norm_eps)

    def smear(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """x[t] += smear_λ·σ(W·x[t, :24])·x[t−1]; `previous` is the embedding before x[0] (decoding)."""
        before = torch.cat(
            [previous if previous is not None else torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1
        )
        gate = torch.sigmoid(self.smear_gate(x[..., :GATE_CHANNELS_SMEAR]))
        return x + self.smear_lambda.to(x.dtype) * gate * before
