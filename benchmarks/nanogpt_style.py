"""A third peer for bench_train: GPT-2 laid out as nanoGPT's model.py lays it out.

Issue 3's training goal is stated against nanoGPT (441k tokens/s compiled on an H100, measured
when the issue was filed, with another torch), and nanoGPT is not a package we can install. So
this module rebuilds its architecture, written here from its published description, to time it
in the same run as ours and HF's: one fused `c_attn` Linear for q, k and v; `F.scaled_dot_product_attention`
with `is_causal=True`; exact (erf) GELU; LayerNorm with bias; no dropout; and `lm_head`
tied to the token embedding (one [vocab, n_embd] matrix, no unembedding bias), initialised
N(0, 0.02) with the residual projections scaled by 1/sqrt(2 n_layer). It is a timing reference,
not a model we check against: its numbers are not compared with ours anywhere.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from solution import TransformerConfig


class _Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.attn_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.mlp_proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, pos, d_model = x.shape
        # nanoGPT's own view/transpose layout, kept as it is: this file times that layout
        q, k, v = self.c_attn(self.ln_1(x)).split(d_model, dim=2)
        q, k, v = (t.view(batch, pos, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(z.transpose(1, 2).contiguous().view(batch, pos, d_model))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPTStyle(nn.Module):
    """GPT-2 in nanoGPT's layout; forward(tokens) gives logits [batch pos d_vocab]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2 and nanoGPT
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
