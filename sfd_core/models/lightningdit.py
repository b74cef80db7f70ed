"""LightningDiT with the SFD extensions (two half-width timestep embedders, REPA projector).

Layout and state-dict keys follow the official ``models/lightningdit.py`` so released checkpoints load strictly.
Channels of ``x`` are [texture | semantic] (semantic last); timesteps are ``(t_tex, t_sem)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sfd_core.kernels import fused_op_names, kernels_run_on
from sfd_core.kernels.norm_modulate import norm_modulate, residual_norm_modulate
from sfd_core.models.guidance import guided_velocity
from sfd_core.models.layers import (Attention, LabelEmbedder, PatchEmbed, RMSNorm, SwiGLU, TimestepEmbedder,
                                    modulate, sincos_pos_embed_2d)
from sfd_core.models.rope import VisionRotaryEmbeddingFast

Timesteps = torch.Tensor | Sequence[torch.Tensor]
# A sublayer's gated residual not yet added to the stream: (y, gate, bias) stands for x + gate (y + bias), y being a
# linear layer's output before its bias. Fused blocks leave their MLP residual pending for the next adaLN norm
# kernel, which adds it on its way through the stream (one pass instead of two) and whose token sums give the
# gate and bias gradients (no separate reductions over the rows).
PendingResidual = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def add_pending(x: torch.Tensor, pending: PendingResidual | None) -> torch.Tensor:
    if pending is None:
        return x
    y, gate, bias = pending
    return x + gate.unsqueeze(1) * (y + bias.to(y.dtype))


def modulated_input(x: torch.Tensor, pending: PendingResidual | None, norm: RMSNorm, shift: torch.Tensor,
                    scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernels: the stream with ``pending`` added, and ``modulate(norm(stream), shift, scale)``."""
    if pending is None:
        return x, norm_modulate(x, norm.weight, shift, scale, norm.eps)
    y, gate, bias = pending
    return residual_norm_modulate(x, y, gate, norm.weight, shift, scale, norm.eps, bias)


class LightningDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, fused_ops: frozenset[str] = frozenset()):
        super().__init__()
        self.fused = "norm_modulate" in fused_ops
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, fused="qkv_norm_rope" in fused_ops)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)), fused="swiglu" in fused_ops)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def defers_residuals(self, x: torch.Tensor) -> bool:
        """Whether this block runs the fused path, ``forward_deferred``, for ``x``."""
        return self.fused and kernels_run_on(x)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRotaryEmbeddingFast) -> torch.Tensor:
        if self.defers_residuals(x):
            return add_pending(*self.forward_deferred(x, None, c, rope))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def forward_deferred(self, x: torch.Tensor, pending: PendingResidual | None, c: torch.Tensor,
                         rope: VisionRotaryEmbeddingFast) -> tuple[torch.Tensor, PendingResidual]:
        """The same sublayers through the sfd::*norm_modulate kernels: returns the stream with ``pending`` (the
        previous block's MLP residual) and this block's attention residual added, and this block's MLP residual,
        pending."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x, h = modulated_input(x, pending, self.norm1, shift_msa, scale_msa)
        attention = (F.linear(self.attn.attend(h, rope), self.attn.proj.weight), gate_msa, self.attn.proj.bias)
        x, h = modulated_input(x, attention, self.norm2, shift_mlp, scale_mlp)
        return x, (F.linear(self.mlp.hidden(h), self.mlp.w3.weight), gate_mlp, self.mlp.w3.bias)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, fused_norm: bool = False):
        super().__init__()
        self.fused = fused_norm
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, pending: PendingResidual | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        if self.fused and kernels_run_on(x):
            return self.linear(modulated_input(x, pending, self.norm_final, shift, scale)[1])
        return self.linear(modulate(self.norm_final(add_pending(x, pending)), shift, scale))


def repa_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, out_dim))


class LightningDiT(nn.Module):
    """Velocity network. ``semantic_channels > 0`` selects SFD mode (timesteps ``(t_tex, t_sem)``, embedded
    by ``t_embedder_sem`` and ``t_embedder_tex`` and concatenated [sem | tex]); 0 is plain LightningDiT."""

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 48,
                 semantic_channels: int = 16, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, num_classes: int = 1000,
                 use_repa: bool = True, repa_depth: int = 2, repa_projector_dim: int = 2048,
                 repa_out_dim: int = 768, learn_sigma: bool = False, low_precision_residual: bool = False,
                 fused_kernels: bool | Sequence[str] = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if not 0 <= semantic_channels <= in_channels:
            raise ValueError(f"semantic_channels {semantic_channels} must lie in [0, in_channels={in_channels}]")
        if use_repa and not 1 <= repa_depth <= depth:
            raise ValueError(f"repa_depth {repa_depth} must lie in [1, depth={depth}]")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.semantic_channels = semantic_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.use_repa = use_repa
        self.repa_depth = repa_depth
        # Under autocast, keep the residual stream in the autocast dtype (bf16) instead of letting the fp32
        # position embedding promote it: half the bytes for every norm, gate and residual add (the GPU
        # training step is bound by that traffic between the matmuls). Without autocast nothing changes.
        self.low_precision_residual = low_precision_residual
        # Triton kernels (sfd_core.kernels) on CUDA, all (True) or those named (FUSED_OPS): the adaLN norm +
        # modulation with the attention's gated residual, the qkv split + QK norm + RoPE, the SwiGLU middle. Same
        # parameters and numerics to bf16 precision, a faster training step.
        self.fused_kernels = fused_op_names(fused_kernels)
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        if semantic_channels > 0:
            if hidden_size % 2:
                raise ValueError("SFD mode splits the timestep embedding in halves; hidden_size must be even")
            self.t_embedder_sem = TimestepEmbedder(hidden_size // 2)
            self.t_embedder_tex = TimestepEmbedder(hidden_size // 2)
        else:
            self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding; a frozen Parameter (not a buffer) because the official state dict has it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.feat_rope = VisionRotaryEmbeddingFast(hidden_size // num_heads, self.grid_size)
        self.blocks = nn.ModuleList(LightningDiTBlock(hidden_size, num_heads, mlp_ratio, self.fused_kernels)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      "norm_modulate" in self.fused_kernels)
        if use_repa:
            self.repa_projector = repa_projector(hidden_size, repa_projector_dim, repa_out_dim)
        self.initialize_weights()

    # ---------------------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid_size).float().unsqueeze(0))
        patch_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in self._timestep_embedders():
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _timestep_embedders(self) -> list[TimestepEmbedder]:
        if self.semantic_channels > 0:
            return [self.t_embedder_sem, self.t_embedder_tex]
        return [self.t_embedder]

    # ----------------------------------------------------------------------------------------- forward
    def embed_timesteps(self, t: Timesteps, batch: int) -> torch.Tensor:
        """``(t_tex, t_sem)`` (or one tensor in plain mode) -> [B, hidden]; SFD order is [sem | tex]."""
        if isinstance(t, torch.Tensor):
            t_tex = t_sem = t
        else:
            t_tex, t_sem = t
        t_tex = t_tex.expand(batch) if t_tex.ndim == 0 else t_tex
        if self.semantic_channels == 0:
            return self.t_embedder(t_tex)
        if isinstance(t, torch.Tensor):
            raise TypeError("an SFD model needs timesteps as a pair (t_tex, t_sem)")
        t_sem = t_sem.expand(batch) if t_sem.ndim == 0 else t_sem
        return torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=-1)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        batch, p, g, channels = tokens.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = tokens.reshape(batch, g, g, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, g * p, g * p)

    def run_backbone(self, x: torch.Tensor, c: torch.Tensor, with_repa: bool):
        """Blocks + final layer for conditioning vectors ``c``; returns (velocity, REPA projection or None)."""
        tokens = self.x_embedder(x) + self.pos_embed
        if self.low_precision_residual and torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(torch.get_autocast_dtype(tokens.device.type))
        projection, pending = None, None
        for depth, block in enumerate(self.blocks, start=1):
            if block.defers_residuals(tokens):   # all blocks or none: pending is None for the stock blocks
                tokens, pending = block.forward_deferred(tokens, pending, c, self.feat_rope)
            else:
                tokens = block(tokens, c, self.feat_rope)
            if with_repa and depth == self.repa_depth:
                tokens, pending = add_pending(tokens, pending), None
                projection = self.repa_projector(tokens)
        out = self.unpatchify(self.final_layer(tokens, c, pending))
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        return out, projection

    def forward(self, x: torch.Tensor, t: Timesteps, y: torch.Tensor, drop_labels: torch.Tensor | None = None):
        """Velocity [B, C, H, W]; in training mode with REPA, ``(velocity, projection [B, N, repa_out_dim])``.

        Label dropout happens in training mode (random with ``class_dropout_prob``), or wherever the optional
        [B] bool ``drop_labels`` is true (which also makes training-mode dropout deterministic)."""
        if drop_labels is not None or (self.training and self.y_embedder.dropout_prob > 0):
            y = self.y_embedder.drop_labels(y, drop_labels)
        c = self.embed_timesteps(t, x.shape[0]) + self.y_embedder(y)
        with_repa = self.training and self.use_repa
        velocity, projection = self.run_backbone(x, c, with_repa)
        return (velocity, projection) if with_repa else velocity

    def conditional_velocity(self, x: torch.Tensor, t: Timesteps, y: torch.Tensor) -> torch.Tensor:
        """The velocity for labels ``y`` whatever the mode: no label dropout, no REPA output."""
        c = self.embed_timesteps(t, x.shape[0]) + self.y_embedder(y)
        return self.run_backbone(x, c, with_repa=False)[0]

    def forward_with_autoguidance(self, x: torch.Tensor, t: Timesteps, y: torch.Tensor, guidance_model: nn.Module,
                                  cfg_scale: float, cfg_scale_sem: float | None = None,
                                  cfg_scale_tex: float | None = None) -> torch.Tensor:
        """AutoGuidance (official ``forward_with_autoguidance``): ``v_weak + s (v_self - v_weak)`` with the weak
        ``guidance_model`` conditional on the same labels and times; the semantic / texture channels use
        ``cfg_scale_sem`` / ``cfg_scale_tex`` (each defaults to ``cfg_scale``)."""
        v_good = self.conditional_velocity(x, t, y)
        weak = getattr(guidance_model, "conditional_velocity", None)
        v_bad = weak(x, t, y) if weak is not None else guidance_model(x, t, y)
        scale_tex = cfg_scale if cfg_scale_tex is None else cfg_scale_tex
        scale_sem = cfg_scale if cfg_scale_sem is None else cfg_scale_sem
        return guided_velocity(v_good, v_bad, scale_tex, scale_sem, self.semantic_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: Timesteps, y: torch.Tensor, cfg_scale: float,
                         interval_start: float = 0.0) -> torch.Tensor:
        """Classifier-free guidance on all channels: one doubled batch (labels ``y`` and the null label).

        Texture channels stay unguided while ``t_tex < interval_start``, semantic ones while
        ``t_sem < interval_start`` (plain mode: one time for all channels)."""
        if self.y_embedder.embedding_table.num_embeddings <= self.num_classes:
            raise ValueError("classifier-free guidance needs a null label row (class_dropout_prob > 0)")
        batch = x.shape[0]
        null = torch.full_like(y, self.num_classes)
        if isinstance(t, torch.Tensor):
            t_tex = t_sem = t.expand(batch) if t.ndim == 0 else t
            doubled_t: Timesteps = torch.cat([t_tex, t_tex])
        else:
            t_tex, t_sem = (ti.expand(batch) if ti.ndim == 0 else ti for ti in t)
            doubled_t = (torch.cat([t_tex, t_tex]), torch.cat([t_sem, t_sem]))
        c = self.embed_timesteps(doubled_t, 2 * batch) + self.y_embedder(torch.cat([y, null]))
        velocity, _ = self.run_backbone(torch.cat([x, x]), c, with_repa=False)
        v_cond, v_uncond = velocity.chunk(2, dim=0)
        return guided_velocity(v_cond, v_uncond, cfg_scale, cfg_scale, self.semantic_channels,
                               guide_tex=t_tex >= interval_start, guide_sem=t_sem >= interval_start)
