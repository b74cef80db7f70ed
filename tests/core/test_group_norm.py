"""ChannelsLastGroupNorm: the same function as nn.GroupNorm (float64 reference), on its own and inside the VAE."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfd_core.encoders.group_norm import ChannelsLastGroupNorm, use_channels_last_group_norm
from sfd_core.encoders.texture_vae import ldm_autoencoder_config
from sfd_core.standins import TINY_LDM_ARCH


def tiny_ldm_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**ldm_autoencoder_config({**TINY_LDM_ARCH, "sample_size": 32})).eval()


def random_group_norm(groups: int, channels: int, seed: int) -> nn.GroupNorm:
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("offset", [0.0, 100.0])   # 100: |mean| >> std, where E[x^2] - E[x]^2 would cancel
@pytest.mark.parametrize("groups,channels", [(8, 32), (1, 6), (6, 6)])
def test_matches_float64_group_norm_on_channels_last(groups, channels, offset):
    stock = random_group_norm(groups, channels, seed=channels + groups)
    gen = torch.Generator().manual_seed(groups)
    x = (3 * torch.randn(2, channels, 9, 7, generator=gen) + offset
         + torch.randn(1, channels, 1, 1, generator=gen)).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(stock).double()(x.double())
    fast = copy.deepcopy(stock)
    assert use_channels_last_group_norm(fast) == 1 and type(fast) is ChannelsLastGroupNorm
    out = fast(x)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=2e-5)


def test_bf16_input_gives_bf16_output_as_close_as_the_stock_op():
    stock = random_group_norm(4, 16, seed=3)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4)).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(stock).double()(x.double())
    fast = copy.deepcopy(stock).bfloat16()
    use_channels_last_group_norm(fast)
    out = fast(x.bfloat16())
    assert out.dtype == torch.bfloat16
    stock_error = (copy.deepcopy(stock).bfloat16()(x.bfloat16()).double() - reference).abs().max()
    assert (out.double() - reference).abs().max() <= 1.01 * stock_error + 1e-6


def test_other_layouts_and_ranks_take_the_stock_op():
    norm = random_group_norm(2, 8, seed=5)
    fast = copy.deepcopy(norm)
    use_channels_last_group_norm(fast)
    gen = torch.Generator().manual_seed(6)
    for x in (torch.randn(2, 8, 5, 5, generator=gen), torch.randn(2, 8, 25, generator=gen)):
        assert torch.equal(fast(x), norm(x))


def test_compiled_matches_float64_group_norm():
    """The stage runs this module under torch.compile; the compiled graph computes the same function."""
    stock = random_group_norm(8, 32, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = (3 * torch.randn(2, 32, 9, 7, generator=gen) + 100.0).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(stock).double()(x.double())
    fast = copy.deepcopy(stock)
    use_channels_last_group_norm(fast)
    torch.testing.assert_close(torch.compile(fast)(x).double(), reference, rtol=1e-5, atol=2e-5)


def test_swapped_vae_encoder_keeps_its_state_dict_and_encodes_the_same():
    torch.manual_seed(0)
    vae = tiny_ldm_vae()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    fast = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    norms = sum(isinstance(m, nn.GroupNorm) for m in fast.encoder.modules())
    assert use_channels_last_group_norm(fast.encoder) == norms > 0
    assert fast.state_dict().keys() == vae.state_dict().keys()
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    with torch.no_grad():
        want = vae.encode(x).latent_dist
        got = fast.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.std, want.std, rtol=1e-4, atol=1e-5)


def test_only_the_compiled_channels_last_extraction_path_swaps_the_encoder_norms():
    from sfd_core.encoders import TextureVAE
    from sfd_core.extract_features import TextureEncoder

    def norm_types(compile: bool, channels_last: bool) -> set[type]:
        encoder = TextureEncoder(TextureVAE(tiny_ldm_vae(), "ldm_f16d32"), torch.device("cpu"), "fp32", compile,
                                 channels_last, batch_size=2)   # torch.compile is lazy: nothing compiles here
        return {type(m) for m in encoder.autoencoder.encoder.modules() if isinstance(m, nn.GroupNorm)}

    assert norm_types(compile=True, channels_last=True) == {ChannelsLastGroupNorm}
    assert norm_types(compile=False, channels_last=True) == {nn.GroupNorm}
    assert norm_types(compile=True, channels_last=False) == {nn.GroupNorm}
