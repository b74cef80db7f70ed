"""Explicit key map from an LDM/VQGAN-KL autoencoder state dict to diffusers ``AutoencoderKL`` (SPEC §2.1).

Written out by hand because the stock diffusers converters ignore per-level attention blocks
(``encoder.down.{i}.attn.*`` / ``decoder.up.{i}.attn.*``). Every key must map; unknown keys are an error.
"""
from __future__ import annotations

import re

import torch

# Top-level prefixes of training-only modules found in LDM checkpoints (discriminator/LPIPS, VF-loss encoder).
IGNORED_PREFIXES = ("loss.", "foundation_model.")

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_SAME = {"conv_in", "conv_out"}


class UnmappedKeyError(KeyError):
    """An LDM checkpoint key has no counterpart in the diffusers model."""


def _inner(rest: str, parts: dict[str, str]) -> str:
    head, _, param = rest.partition(".")
    if head not in parts or param not in ("weight", "bias"):
        raise UnmappedKeyError(rest)
    return f"{parts[head]}.{param}"


def _mid(rest: str) -> str:
    # mid.block_1 / mid.block_2 / mid.attn_1
    m = re.fullmatch(r"(block_1|block_2|attn_1)\.(.+)", rest)
    if m is None:
        raise UnmappedKeyError(rest)
    name, tail = m.groups()
    if name == "attn_1":
        return "mid_block.attentions.0." + _inner(tail, _ATTN_PARTS)
    return f"mid_block.resnets.{int(name[-1]) - 1}." + _inner(tail, _RESNET_PARTS)


def _level(side: str, level: int, rest: str, num_levels: int) -> str:
    if side == "encoder":
        block = f"down_blocks.{level}"
        sampler = "downsample"
    else:  # LDM numbers decoder levels from the highest resolution; diffusers from the lowest
        block = f"up_blocks.{num_levels - 1 - level}"
        sampler = "upsample"
    m = re.fullmatch(r"(block|attn)\.(\d+)\.(.+)", rest)
    if m is not None:
        kind, j, tail = m.groups()
        if kind == "block":
            return f"{block}.resnets.{j}." + _inner(tail, _RESNET_PARTS)
        return f"{block}.attentions.{j}." + _inner(tail, _ATTN_PARTS)
    m = re.fullmatch(rf"{sampler}\.conv\.(weight|bias)", rest)
    if m is not None:
        return f"{block}.{sampler}rs.0.conv.{m.group(1)}"
    raise UnmappedKeyError(rest)


def ldm_to_diffusers_key(key: str, num_levels: int) -> str:
    """Map one LDM key (``encoder.down.4.attn.1.q.weight``) to its diffusers name; raise UnmappedKeyError."""
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder"):
        raise UnmappedKeyError(key)
    try:
        head, _, tail = rest.partition(".")
        if head in _SAME:
            return f"{side}.{head}.{tail}"
        if head == "norm_out":
            return f"{side}.conv_norm_out.{tail}"
        if head == "mid":
            return f"{side}.{_mid(tail)}"
        if head == ("down" if side == "encoder" else "up"):
            level, _, inner = tail.partition(".")
            return f"{side}.{_level(side, int(level), inner, num_levels)}"
    except (UnmappedKeyError, ValueError):
        pass
    raise UnmappedKeyError(key)


def convert_ldm_vae_state_dict(ldm_state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename every key; squeeze 1x1 attention convs to Linear weights. Drops only ``IGNORED_PREFIXES``."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in ldm_state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        try:
            new = ldm_to_diffusers_key(key, num_levels)
        except UnmappedKeyError:
            unmapped.append(key)
            continue
        if ".attentions." in new and value.ndim == 4:  # LDM 1x1 convs -> diffusers Linear
            value = value[:, :, 0, 0]
        out[new] = value
    if unmapped:
        raise UnmappedKeyError(f"{len(unmapped)} LDM key(s) have no diffusers counterpart, e.g. {unmapped[:5]}")
    return out


def _invert(parts: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in parts.items()}


def _inner_back(rest: str, parts: dict[str, str]) -> str:
    head, param = rest.rsplit(".", 1)
    if head not in parts:
        raise UnmappedKeyError(rest)
    return f"{parts[head]}.{param}"


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """Inverse of ``ldm_to_diffusers_key`` (used to export stand-ins in the LDM checkpoint format)."""
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    resnet, attn = _invert(_RESNET_PARTS), _invert(_ATTN_PARTS)
    head, _, tail = rest.partition(".")
    if side in ("encoder", "decoder"):
        if head in _SAME:
            return key
        if head == "conv_norm_out":
            return f"{side}.norm_out.{tail}"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
        if m is not None:
            kind, j, inner = m.groups()
            if kind == "resnets":
                return f"{side}.mid.block_{int(j) + 1}." + _inner_back(inner, resnet)
            return f"{side}.mid.attn_1." + _inner_back(inner, attn)
        m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         rest)
        if m is not None:
            blocks, i, kind, j, inner = m.groups()
            level = int(i) if blocks == "down_blocks" else num_levels - 1 - int(i)
            ldm_level = f"{side}.{'down' if blocks == 'down_blocks' else 'up'}.{level}"
            if kind == "resnets":
                return f"{ldm_level}.block.{j}." + _inner_back(inner, resnet)
            if kind == "attentions":
                return f"{ldm_level}.attn.{j}." + _inner_back(inner, attn)
            return f"{ldm_level}.{kind[:-2]}.{inner}"  # downsamplers.0.conv.w -> downsample.conv.w
    raise UnmappedKeyError(key)


def convert_diffusers_to_ldm_state_dict(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM layout (attention Linear weights back to 1x1 convs)."""
    out = {}
    for key, value in state.items():
        new = diffusers_to_ldm_key(key, num_levels)
        if ".attn" in new and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out
