"""MiniMind, the whole model in one file: config, blocks, causal LM (checkpoint files: ``minimind.checkpoint``).

Two generations of MiniMind (github jingyaogong/minimind) share one layout and load with their
own state_dict key names:

* ``arch="minimind2"`` (the MiniMind2 release): RMSNorm eps 1e-5, FFN size
  ``64 * ceil(int(H * 8 / 3) / 64)``, no q/k norm; MoE = routed experts + shared expert(s), top-2,
  softmax router stored as a raw parameter ``mlp.gate.weight``.
* ``arch="minimind3"`` (MiniMind-3, numerically Qwen3): eps 1e-6, FFN size ``ceil(H * pi / 64) * 64``,
  per-head RMSNorm on q and k before RoPE; MoE = top-1 over routed experts, router is an
  ``nn.Linear``, no shared expert.

Common to both: pre-norm blocks, rotary embeddings in the rotate-half layout, grouped-query
attention, SwiGLU FFN ``down(silu(gate(x)) * up(x))``, no bias anywhere, lm_head tied to the
embedding. Every projection in attention and FFN is a real ``nn.Linear`` so LoRA layers can be
swapped in by module name.

Shapes in comments: B batch, T new tokens, S = past + T keys, C hidden, H query heads,
Hkv key/value heads, D head_dim, V vocab, F FFN size, E routed experts, N = B * T tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("minimind2", "minimind3")
# One layer's (k, v), each (B, S, Hkv, D): MiniMind's own cache layout.
KVCache = List[Tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class MiniMindConfig:
    """Hyper-parameters of a MiniMind model; field names follow MiniMind's own config.

    Fields left as ``None`` take the default of the chosen ``arch`` (see the module docstring).

    Args:
        arch: ``"minimind2"`` or ``"minimind3"``; selects eps, FFN size rule, q/k norm and MoE layout.
        hidden_size: model width C.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: query heads H.
        num_key_value_heads: key/value heads Hkv (H must be a multiple of it).
        head_dim: per-head width D; default ``hidden_size // num_attention_heads``.
        vocab_size: V.
        intermediate_size: FFN width F; default from the arch's rule.
        rms_norm_eps: RMSNorm epsilon; default 1e-5 (minimind2) or 1e-6 (minimind3).
        rope_theta: RoPE base.
        max_position_embeddings: length of the precomputed RoPE table.
        dropout: dropout on embeddings, attention probabilities and attention output.
        tie_word_embeddings: share ``lm_head.weight`` with ``model.embed_tokens.weight``.
        use_qk_norm: per-head RMSNorm on q and k; default True for minimind3 only.
        use_moe: replace each FFN by a mixture of experts.
        n_routed_experts: routed experts E (MiniMind-3 calls it ``num_experts``).
        n_shared_experts: always-on experts added to the routed output; default 1 / 0.
        num_experts_per_tok: experts per token (top-k); default 2 / 1.
        norm_topk_prob: renormalise the top-k router weights to sum to one.
        aux_loss_alpha: weight of the load-balancing loss (MiniMind-3: ``router_aux_loss_coef``);
            default 0.1 / 5e-4.
        seq_aux: minimind2 only: balance per sequence rather than per batch.
        bos_token_id: id of ``<|im_start|>``.
        eos_token_id: id of ``<|im_end|>``.
    """

    arch: str = "minimind2"
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    vocab_size: int = 6400
    intermediate_size: Optional[int] = None
    rms_norm_eps: Optional[float] = None
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    use_qk_norm: Optional[bool] = None
    use_moe: bool = False
    n_routed_experts: int = 4
    n_shared_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    norm_topk_prob: bool = True
    aux_loss_alpha: Optional[float] = None
    seq_aux: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        mm2 = self.arch == "minimind2"
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            if mm2:
                self.intermediate_size = 64 * ((int(self.hidden_size * 8 / 3) + 63) // 64)
            else:
                self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.rms_norm_eps is None:
            self.rms_norm_eps = 1e-5 if mm2 else 1e-6
        if self.use_qk_norm is None:
            self.use_qk_norm = not mm2
        if self.n_shared_experts is None:
            self.n_shared_experts = 1 if mm2 else 0
        if self.num_experts_per_tok is None:
            self.num_experts_per_tok = 2 if mm2 else 1
        if self.aux_loss_alpha is None:
            self.aux_loss_alpha = 0.1 if mm2 else 5e-4
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], "
                f"got {self.num_experts_per_tok}"
            )

    def to_dict(self) -> dict:
        """Returns: the config as a plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniMindConfig":
        """Build a config from a dict such as MiniMind's ``config.json``.

        MiniMind-3 spellings (``num_experts``, ``router_aux_loss_coef``, ``moe_intermediate_size``)
        are mapped to ours; keys we do not model (``flash_attn``, ``hidden_act``...) are ignored.

        Args:
            d: the dict.

        Returns:
            A ``MiniMindConfig``.
        """
        d = dict(d)
        aliases = {"num_experts": "n_routed_experts", "router_aux_loss_coef": "aux_loss_alpha",
                   "moe_intermediate_size": "intermediate_size"}
        for theirs, ours in aliases.items():
            if theirs in d and ours not in d:
                d[ours] = d.pop(theirs)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).type_as(x)


def rope_table(head_dim: int, end: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, each (end, D), frequencies ``1/theta^(2i/D)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)  # (end, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (end, D): rotate-half layout
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` for ``x = cat(x1, x2)`` on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by cos/sin (B or 1, T, 1, D)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    b, hkv, s, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE, optional per-head q/k RMSNorm and a KV cache."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.use_qk_norm = c.use_qk_norm
        self.dropout = c.dropout
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: Tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B or 1, T, 1, D)
        past: Optional[Tuple[torch.Tensor, torch.Tensor]],  # (B, S - T, Hkv, D) each
        mask: Optional[torch.Tensor],  # (B, 1, T, S) bool, True = may attend; None = plain causal
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=1)  # (B, S, Hkv, D)
            v = torch.cat([past[1], v], dim=1)
        present = (k, v)
        n_rep = self.n_heads // self.n_kv_heads
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = repeat_kv(k.transpose(1, 2), n_rep)  # (B, H, S, D)
        v = repeat_kv(v.transpose(1, 2), n_rep)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # No padding and no cache (or a single new token): the plain causal kernel.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.resid_dropout(self.o_proj(out)), present


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, (..., C) -> (..., C)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RawRouter(nn.Module):
    """MiniMind2's router: a bare ``weight`` (E, C) parameter, not an ``nn.Linear``.

    Keeping it a non-Linear module means LoRA replacement by type never touches the router,
    as in MiniMind2 itself.
    """

    def __init__(self, n_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts with a softmax top-k router (+ shared experts in minimind2).

    After ``forward``, ``self.aux_loss`` holds the load-balancing loss (zero in eval mode).
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(E)])
        if config.arch == "minimind2":
            self.gate = RawRouter(E, config.hidden_size)
        else:
            self.gate = nn.Linear(config.hidden_size, E, bias=False)
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        scores = self.gate(flat).softmax(dim=-1)  # (N, E)
        top_w, top_i = torch.topk(scores, k=c.num_experts_per_tok, dim=-1, sorted=False)  # (N, k)
        # MiniMind2 renormalises only for top-k > 1; MiniMind-3 always (a no-op for top-1).
        if c.norm_topk_prob and (c.num_experts_per_tok > 1 or c.arch == "minimind3"):
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(flat)  # (N, C)
        for e, expert in enumerate(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)
            if token.numel():
                y.index_add_(0, token, (expert(flat[token]) * top_w[token, slot, None]).to(y.dtype))
        y = y.view(B, T, C)
        for expert in getattr(self, "shared_experts", []):
            y = y + expert(x)
        self.aux_loss = self._balance_loss(scores, top_i, B, T) if self.training else scores.new_zeros(())
        return y

    def _balance_loss(self, scores: torch.Tensor, top_i: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Load-balancing loss, each generation's own formula: fraction routed x mean router prob."""
        c, E, k = self.config, self.config.n_routed_experts, self.config.num_experts_per_tok
        if c.aux_loss_alpha <= 0:
            return scores.new_zeros(())
        if c.arch == "minimind2" and c.seq_aux:
            counts = scores.new_zeros(B, E).scatter_add_(1, top_i.view(B, -1), scores.new_ones(B, T * k))
            load = counts / (T * k / E)  # (B, E)
            return (load * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * c.aux_loss_alpha
        if c.arch == "minimind2":
            load = F.one_hot(top_i.reshape(-1), E).float().mean(0) * E  # (E,)
            return (load * scores.mean(0)).sum() * c.aux_loss_alpha
        load = F.one_hot(top_i, E).float().mean(0)  # (k, E)
        return (load * scores.mean(0)).sum() * E * c.aux_loss_alpha


class MiniMindBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, rope, past, mask):
        h, present = self.self_attn(self.input_layernorm(x), rope, past, mask)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class MiniMindModel(nn.Module):
    """Embedding, blocks and final norm: ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        cos, sin = rope_table(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_pos, D)
        self.register_buffer("rope_sin", sin, persistent=False)


@dataclass
class CausalLMOutput:
    """What ``MiniMindForCausalLM.forward`` returns.

    Attributes:
        logits: (B, T_kept, V) next-token logits.
        loss: mean cross-entropy over labels != -100 (shifted by one), or None without labels.
            It does not include ``aux_loss``; add it yourself when training an MoE model.
        aux_loss: sum of the MoE load-balancing losses (a zero scalar for dense models or in eval).
        past_key_values: per-layer (k, v) each (B, S, Hkv, D), or None when ``use_cache`` is False.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    past_key_values: Optional[KVCache]


class MiniMindForCausalLM(nn.Module):
    """MiniMind causal language model with MiniMind's state_dict key names.

    Args:
        config: a ``MiniMindConfig`` (default: MiniMind2-small, hidden 512, 8 layers).
    """

    def __init__(self, config: Optional[MiniMindConfig] = None):
        super().__init__()
        self.config = config or MiniMindConfig()
        self.model = MiniMindModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if self.config.tie_word_embeddings:
            self.model.embed_tokens.weight = self.lm_head.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: (B, T) token ids (the new tokens only when ``past_key_values`` is given).
            attention_mask: optional (B, S) with 1 for real tokens and 0 for padding, S = past + T.
                Padding may be on the left or the right; positions count only real tokens, so a
                padded row gives the same logits as the same row unpadded.
            labels: optional (B, T) targets aligned with ``input_ids``; the loss compares logits at
                t with labels at t + 1 and ignores -100.
            past_key_values: the cache returned by a previous call with ``use_cache=True``.
            use_cache: return the updated cache in ``past_key_values``.
            logits_to_keep: if > 0, compute logits for the last that many positions only.

        Returns:
            A ``CausalLMOutput`` with ``logits``, ``loss``, ``aux_loss`` and ``past_key_values``.

        Raises:
            ValueError: on a cache longer than the RoPE table or a mask of the wrong length.
        """
        m = self.model
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[1] if past_key_values else 0
        S = past_len + T
        if S > m.rope_cos.shape[0]:
            raise ValueError(f"sequence length {S} exceeds max_position_embeddings {m.rope_cos.shape[0]}")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be (batch, past + new) = {(B, S)}, got {tuple(attention_mask.shape)}")

        if attention_mask is None or bool(attention_mask.all()):
            pos = torch.arange(past_len, S, device=input_ids.device)[None]  # (1, T)
            mask = None
            if past_len and T > 1:  # new queries attend to the whole cache plus causally to each other
                mask = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past_len)[None, None]
        else:
            keep = attention_mask.bool()
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # (B, T): real tokens only
            causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past_len)  # (T, S)
            mask = causal[None] & keep[:, None, :]  # (B, T, S)
            # A padding query may see no key at all; let it see everything so softmax stays finite.
            mask = mask | ~mask.any(-1, keepdim=True)
            mask = mask[:, None]  # (B, 1, T, S)
        rope = (m.rope_cos[pos][:, :, None], m.rope_sin[pos][:, :, None])  # (B or 1, T, 1, D)

        h = m.dropout(m.embed_tokens(input_ids))  # (B, T, C)
        presents = []
        for i, layer in enumerate(m.layers):
            h, present = layer(h, rope, past_key_values[i] if past_key_values else None, mask)
            presents.append(present)
        h = m.norm(h)
        aux_loss = sum((l.mlp.aux_loss for l in m.layers if isinstance(l.mlp, MoEFeedForward)), h.new_zeros(()))
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)  # (B, T_kept, V)

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            loss = F.cross_entropy(shift_logits.float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                              past_key_values=presents if use_cache else None)

    def num_parameters(self) -> int:
        """Returns: the number of distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())
