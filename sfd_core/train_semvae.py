"""SemVAE training (SPEC §1.3-1.4): ``python -m sfd_core.train_semvae --config cfg.json`` (or under torchrun).

Reads DINOv2 patch tokens from a dinov2_features stage (``features.zarr``: ``dino``/``dino_flip`` [N, D, h, w],
one of the two picked per sample) as [B, h*w, D]; the last ``eval_samples`` samples are held out for evaluation
(feature MSE, per-token cosine, KL). AdamW with weight decay, LR warmup from ``warmup_start`` x lr, constant,
then cosine to ``final_lr_ratio`` x lr; bf16 autocast on GPU; no EMA, no clipping. Data order, posterior noise
and resume follow the same rules as ``sfd_core.train_sfd`` (streams, per-stream generators, checkpoint folders).
Writes ``weights.safetensors`` (architecture in its metadata, loadable by ``sfd_core.semvae.load_semvae``),
``config.json`` (the architecture) and the manifest.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from sfd_core import distributed as dist_utils
from sfd_core.config import ConfigError, load_config
from sfd_core.distributed import TrainingInterrupted
from sfd_core.latent_data import (FEATURES_STORE, StreamBatches, WindowedArrays, array_url, plan_for_arrays,
                                  streams_of_rank, tokens_from_grid)
from sfd_core.reporting import log, metric
from sfd_core.semvae import SemVAE, save_semvae, semvae_loss
from sfd_core.stage_output import finished_manifest
from sfd_core.train_state import (MODEL_FILE, LossCurve, MetricWindow, RunCheckpoints, StreamGenerators,
                                  commit_file, latest_complete, load_model_weights)
from storage import fs
from storage.arrays import open_array
from storage.manifest import read_success, write_success

STAGE = "semvae"
CODE_VERSION = "1"  # pipelines.stages.STAGES["semvae"].code_version
WEIGHTS_FILE = "weights.safetensors"
ARCH_FILE = "config.json"
STOP_CHECK_EVERY = 10
# Official architecture (SPEC §1.2); input_dim and grid default to the feature array's D and h.
OFFICIAL_ARCH = dict(hidden_dim=768, depth=4, num_heads=6, mlp_ratio=4.0, latent_channels=16)
COS_MODES = ("token_axis", "per_token")


@dataclass
class Config:
    """SemVAE training on DINOv2 features."""

    out_url: str = ""
    features_url: str = ""           # dinov2_features stage dir
    arch: dict[str, Any] = field(default_factory=dict)  # SemVAE arguments over OFFICIAL_ARCH
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 64             # global batch (official: 64 per process)
    max_steps: int = 1_000_000
    warmup_steps: int = 500          # linear from warmup_start x lr to lr
    warmup_start: float = 0.01
    constant_steps: int = 800_000    # then cosine over the remaining steps to final_lr_ratio x lr
    final_lr_ratio: float = 0.1
    kl_weight: float = 1e-7
    cos_mode: str = "token_axis"     # official loss: cosine over the token axis; "per_token" = paper Eq. 8
    eval_every: int = 2000
    eval_samples: int = 500          # the last N samples, never trained on
    eval_batch_size: int = 64
    ckpt_every: int = 100_000
    keep_last: int = 2
    keep_every: int = 0
    log_every: int = 100
    seed: int = 0
    device: str | None = None
    precision: str = "bf16"          # autocast on CUDA; CPU runs fp32
    data_streams: int = 0            # 0: world size (see sfd_core.latent_data)
    loader_workers: int = 4
    shuffle_window: int = 4096       # samples shuffled together (whole chunks; see sfd_core.latent_data)


def check_config(cfg: Config) -> None:
    if not cfg.out_url:
        raise ConfigError("Config.out_url: missing; set the stage output directory (local path or s3://)")
    if not cfg.features_url:
        raise ConfigError("Config.features_url: missing; set the dinov2_features stage directory")
    if cfg.cos_mode not in COS_MODES:
        raise ConfigError(f"Config.cos_mode: expected one of {COS_MODES}, got {cfg.cos_mode!r}")
    if cfg.precision not in ("bf16", "fp32"):
        raise ConfigError(f"Config.precision: expected 'bf16' or 'fp32', got {cfg.precision!r}")
    unknown = sorted(set(cfg.arch) - set(OFFICIAL_ARCH) - {"input_dim", "grid"})
    if unknown:
        raise ConfigError(f"Config.arch: unknown SemVAE argument(s) {unknown}")
    for name in ("batch_size", "max_steps", "ckpt_every", "log_every", "eval_every", "keep_last"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"Config.{name}: must be >= 1, got {getattr(cfg, name)}")


def lr_factor(step: int, cfg: Config) -> float:
    """LR multiplier at ``step`` (0-based): warmup, constant, cosine (SPEC §1.4)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / cfg.warmup_steps
    decay_start = cfg.warmup_steps + cfg.constant_steps
    if step < decay_start:
        return 1.0
    decay_steps = max(cfg.max_steps - decay_start, 1)
    progress = min((step - decay_start) / decay_steps, 1.0)
    return cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DinoTokenDataset(WindowedArrays):
    """Micro-batches ``(tokens [B, h*w, D] float32,)`` with the image or its flip chosen per sample."""

    def __init__(self, features_url: str, plan, stream: int):
        super().__init__({"dino": (array_url(features_url, FEATURES_STORE, "dino"),
                                   array_url(features_url, FEATURES_STORE, "dino_flip"))}, plan, stream)

    def finalize_batch(self, fields):
        return (tokens_from_grid(fields["dino"].numpy()),)


@torch.no_grad()
def evaluate(model: SemVAE, features: Any, start: int, stop: int, batch_size: int, seed: int,
             device: torch.device) -> dict[str, float]:
    """Held-out metrics over unflipped rows [start, stop): feature MSE, per-token cosine similarity and KL,
    with posterior samples from a fixed generator (comparable across evaluations)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    totals = np.zeros(3)
    for begin in range(start, stop, batch_size):
        end = min(begin + batch_size, stop)
        tokens = tokens_from_grid(np.asarray(fs.retrying(features.__getitem__, slice(begin, end)))).to(device)
        recon, mean, logvar = model(tokens, generator=generator)
        terms = semvae_loss(recon.float(), tokens, mean.float(), logvar.float(), cos_mode="per_token")
        totals += (end - begin) * np.array([terms["mse"].item(), 1.0 - terms["cos"].item(), terms["kl"].item()])
    model.train(was_training)
    count = stop - start
    return {"eval_mse": float(totals[0] / count), "eval_cosine": float(totals[1] / count),
            "eval_kl": float(totals[2] / count)}


def _manifest_of_features(cfg: Config) -> dict[str, Any]:
    manifest = read_success(cfg.features_url)
    if manifest is None:
        raise ConfigError(f"Config.features_url: {cfg.features_url} has no _SUCCESS.json; run that stage first")
    return manifest


def resolve_arch(cfg: Config, features: Any) -> dict[str, Any]:
    """SemVAE arguments: OFFICIAL_ARCH, then ``cfg.arch``; input_dim and grid must match the features."""
    _, dim, height, width = features.shape
    if height != width:
        raise ConfigError(f"features are {height}x{width}; the SemVAE needs a square token grid")
    arch = {**OFFICIAL_ARCH, "input_dim": int(dim), "grid": int(height), **cfg.arch}
    if (arch["input_dim"], arch["grid"]) != (dim, height):
        raise ConfigError(f"Config.arch: input_dim {arch['input_dim']} / grid {arch['grid']} do not match the "
                          f"features ({dim} channels, {height}x{width})")
    return arch


def run(cfg: Config) -> dict[str, Any]:
    check_config(cfg)
    done = finished_manifest("train_semvae", cfg.out_url)
    if done is not None:
        return done
    return dist_utils.run_in_process_group(cfg.device, lambda info: _train(cfg, info))


def _train(cfg: Config, info: dist_utils.DistInfo) -> dict[str, Any]:
    dist_utils.seed_everything(cfg.seed, info.rank)
    upstream = _manifest_of_features(cfg)
    features = open_array(array_url(cfg.features_url, FEATURES_STORE, "dino"))
    flipped = open_array(array_url(cfg.features_url, FEATURES_STORE, "dino_flip"))
    total = int(features.shape[0])
    eval_count = min(cfg.eval_samples, total // 2)
    train_count = total - eval_count
    arch = resolve_arch(cfg, features)

    num_streams = cfg.data_streams or info.world_size
    if cfg.batch_size % num_streams:
        raise ConfigError(f"Config.batch_size {cfg.batch_size} must be a multiple of the data streams "
                          f"({num_streams})")
    local_streams = streams_of_rank(num_streams, info.rank, info.world_size)
    plan = plan_for_arrays([features, flipped], cfg.batch_size // num_streams, num_streams, cfg.seed,
                           cfg.shuffle_window, num_samples=train_count)

    model = SemVAE(**arch).to(info.device).train()
    wrapped = (DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
               if info.world_size > 1 else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr * lr_factor(0, cfg), betas=tuple(cfg.betas),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                  fused=info.device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if cfg.precision == "bf16" and info.device.type == "cuda" else nullcontext())
    generators = StreamGenerators(cfg.seed, local_streams, info.device)  # posterior noise is drawn on-device
    curve = LossCurve()
    window = MetricWindow(5, info.device)
    evals: list[dict[str, float]] = []

    run_ckpts = RunCheckpoints(fs.join(cfg.out_url, "checkpoints"), info.rank, info.world_size, num_streams,
                               generators, window, curve, cfg.keep_last, cfg.keep_every)
    step, position = 0, {"epoch": 0, "position": 0}
    resumed = run_ckpts.resume()
    if resumed is not None:
        latest, state = resumed
        load_model_weights(model, latest, MODEL_FILE)
        optimizer.load_state_dict(state["optimizer"])
        step, position = int(state["step"]), dict(state["data"])
        evals = list(state["evals"])
        log(f"train_semvae: resumed from {latest} (step {step})")
    batches = StreamBatches([DinoTokenDataset(cfg.features_url, plan, s) for s in local_streams],
                            cfg.loader_workers, position["epoch"], position["position"])
    log(f"train_semvae: SemVAE {arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
        f"{train_count} train / {eval_count} eval samples, batch {cfg.batch_size} = {num_streams} streams x "
        f"{plan.batch_size}, steps {step} -> {cfg.max_steps}")

    def train_step(micro_batches: Sequence[tuple]) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        terms = torch.zeros(4, device=info.device)
        for i, ((tokens,), generator) in enumerate(zip(micro_batches, generators.ordered())):
            tokens = tokens.to(info.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            with nullcontext() if last or info.world_size == 1 else wrapped.no_sync():
                with autocast:
                    recon, mean, logvar = wrapped(tokens, generator=generator)
                out = semvae_loss(recon.float(), tokens, mean.float(), logvar.float(), cos_mode=cfg.cos_mode,
                                  kl_weight=cfg.kl_weight)
                (out["loss"] / len(micro_batches)).backward()
            terms += torch.stack([out["loss"], out["mse"], out["cos"], out["kl"]]).detach()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        return torch.cat([terms / len(micro_batches), grad_norm.detach().float().view(1)])

    def save(at_step: int) -> None:
        url = run_ckpts.save(at_step, model, optimizer, batches.state_dict(), extra={"evals": evals})
        log(f"train_semvae: checkpoint {url}")

    window_start, window_steps = time.perf_counter(), 0
    try:
        with dist_utils.StopOnSignal() as stop:
            while step < cfg.max_steps:
                window.add(train_step(next(batches)))
                step += 1
                window_steps += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    means = window.reduce()
                    elapsed = time.perf_counter() - window_start
                    metric(step, loss=means[0], mse=means[1], cos=means[2], kl=means[3], grad_norm=means[4],
                           lr=optimizer.param_groups[0]["lr"],
                           samples_per_s=window_steps * cfg.batch_size / elapsed if elapsed > 0 else 0.0)
                    curve.record(step, means[0])
                    window_start, window_steps = time.perf_counter(), 0
                if (step % cfg.eval_every == 0 or step == cfg.max_steps) and eval_count > 0:
                    if info.is_main:
                        evals.append({"step": step, **evaluate(model, features, train_count, total,
                                                               cfg.eval_batch_size, cfg.seed, info.device)})
                        metric(step, **{k: v for k, v in evals[-1].items() if k != "step"})
                    dist_utils.barrier()
                stop_now = step % STOP_CHECK_EVERY == 0 and stop.requested(info.device)
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop_now:
                    save(step)
                if stop_now:
                    raise TrainingInterrupted(f"stopped by a signal at step {step}; checkpoint written")
    finally:
        batches.close()
    if run_ckpts.last_saved != step:
        save(step)

    if info.is_main:
        weights_url = fs.join(cfg.out_url, WEIGHTS_FILE)
        commit_file(weights_url, lambda path: save_semvae(model, path))
        fs.write_json(fs.join(cfg.out_url, ARCH_FILE), arch)
        write_success(cfg.out_url, _manifest(cfg, upstream, arch, curve, evals, train_count, eval_count,
                                             latest_complete(run_ckpts.ckpt_dir)))
    dist_utils.barrier()
    return read_success(cfg.out_url)


def _manifest(cfg: Config, upstream: Mapping[str, Any], arch: Mapping[str, Any], curve: LossCurve,
              evals: list[dict[str, float]], train_count: int, eval_count: int, checkpoint: str) -> dict[str, Any]:
    summary = curve.summary()
    counts = {"steps": cfg.max_steps, "train_samples": train_count}
    if eval_count:
        counts["eval_samples"] = eval_count
    return {
        "stage": STAGE, "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url, "code_version": CODE_VERSION,
        "config": dataclasses.asdict(cfg), "upstream": {"dinov2_features": str(upstream.get("fingerprint", ""))},
        "standins": bool(upstream.get("standins")),
        "counts": counts,
        "model": {"arch": dict(arch)},
        "artifacts": {"weights": fs.join(cfg.out_url, WEIGHTS_FILE), "config": fs.join(cfg.out_url, ARCH_FILE),
                      "checkpoint": checkpoint},
        "stats": {},
        "metrics": {"final_loss": summary.get("last", 0.0), "loss_curve": summary,
                    **({k: v for k, v in evals[-1].items() if k != "step"} if evals else {}),
                    "evals": evals},
    }


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(Config, argv, description=__doc__.splitlines()[0])
    dist_utils.main_until_interrupted("train_semvae", lambda: run(cfg))


if __name__ == "__main__":
    main()
