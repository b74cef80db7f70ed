"""Pretrained encoders in their real on-disk formats: texture VAE, DINOv2, Inception, and weight resolution.

Importing this package loads only torch; diffusers, timm and torch_fidelity are imported when a loader runs.
"""
from sfd_core.encoders.dinov2 import (DINOv2Encoder, load_dinov2, preprocess_from_adm,
                                      preprocess_semvae_train)
from sfd_core.encoders.inception import (build_inception, fidelity_kwargs, random_inception_state_dict,
                                         resolve_inception_weights)
from sfd_core.encoders.texture_vae import TextureVAE, images_to_uint8, load_texture_vae
from sfd_core.encoders.weights import WeightsNotFoundError, resolve_weights

__all__ = [
    "DINOv2Encoder", "TextureVAE", "WeightsNotFoundError", "build_inception", "fidelity_kwargs", "images_to_uint8",
    "load_dinov2", "load_texture_vae", "preprocess_from_adm", "preprocess_semvae_train",
    "random_inception_state_dict", "resolve_inception_weights", "resolve_weights",
]
