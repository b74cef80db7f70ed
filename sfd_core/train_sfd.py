"""SFD diffusion training (SPEC §5): ``python -m sfd_core.train_sfd --config cfg.json [--set k=v ...]``,
the same command under ``torchrun --nproc-per-node=N`` for DDP (NCCL on GPUs, gloo on CPU).

Data: ``texture_url`` (texture_latents), ``semantic_url`` (semantic_latents) and ``dino_url`` (dinov2_features)
stage directories, read by ``sfd_core.latent_data`` and normalised with the texture/semantic stats of their
manifests. The global batch is split into ``data_streams`` micro-batches, each with its own data stream and its
own random generator (times, noise, label dropout); a rank runs ``data_streams / world_size`` of them with
gradient accumulation. The result of a step therefore does not depend on the number of processes.

fp32 master weights, bf16 autocast on GPU, AdamW, constant LR, EMA every step, no gradient clipping by default.
Checkpoints (``checkpoints/step_%07d``, see ``sfd_core.train_state``) hold everything needed to continue the
same run; a restarted program resumes from the newest complete one and, on CPU with a fixed seed, reproduces the
uninterrupted loss curve. SIGTERM/SIGINT make it checkpoint and exit. The AutoGuidance "bad" model is this
program with ``recipe="autoguidance_b"``.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sfd_core import distributed as dist_utils
from sfd_core.config import ConfigError, load_config
from sfd_core.distributed import TrainingInterrupted
from sfd_core.latent_data import (FEATURES_STORE, LATENTS_STORE, LatentSources, SFDLatentDataset,
                                  StreamBatches, array_url, channel_stats, sfd_plan, streams_of_rank)
from sfd_core.models import build_model, model_config
from sfd_core.optim import AdamWWithEMA
from sfd_core.reporting import log, metric
from sfd_core.stage_output import finished_manifest
from sfd_core.train_state import (EMA_FILE, MODEL_FILE, LossCurve, MetricWindow, RunCheckpoints,
                                  StreamGenerators, complete_steps, latest_complete, load_model_weights)
from sfd_core.transport import LossConfig, sfd_training_loss
from storage import fs
from storage.arrays import open_array
from storage.manifest import read_success, write_success

STAGE = "sfd_model"
CODE_VERSION = "1"  # pipelines.stages.STAGES["sfd_model"/"autoguidance_model"].code_version
STOP_CHECK_EVERY = 10  # steps between checks for a stop signal (a collective, so not every step)

# Named recipes (SPEC §5.3-5.4). They fill every field left unset (None) in the Config.
RECIPES: dict[str, dict[str, Any]] = {
    # Released weights: 4M steps (800 ep); the 400k checkpoint is the "80 ep" model.
    "main": dict(model="LightningDiT-XL/1", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, repa_weight=1.0,
                 repa_type="cos", repa_depth=2, max_steps=4_000_000, ckpt_every=80_000, keep_every=400_000),
    # Ablation / 80-epoch recipe ([SFD+] train_80ep_lr2e-4.yaml).
    "ablation_80ep": dict(model="LightningDiT-XL/1", lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0,
                          repa_weight=0.5, repa_type="cos_mse", repa_depth=2, max_steps=400_000,
                          ckpt_every=80_000, keep_every=80_000),
    # AutoGuidance "bad" model: SFD LightningDiT-B/1 with the main recipe, used at 60k/70k/120k steps.
    "autoguidance_b": dict(model="LightningDiT-B/1", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                           repa_weight=1.0, repa_type="cos", repa_depth=2, max_steps=400_000,
                           ckpt_every=10_000, keep_every=10_000),
}

# Dense bf16 peak of common accelerators, TFLOP/s (for MFU); override with Config.peak_tflops.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                    "B200": 2250.0, "L40S": 362.0}


@dataclass
class Config:
    """SFD training. Fields left None come from ``recipe``."""

    out_url: str = ""
    texture_url: str = ""            # texture_latents stage dir
    semantic_url: str = ""           # semantic_latents stage dir
    dino_url: str = ""               # dinov2_features stage dir (REPA targets); unused when repa_weight = 0
    recipe: str = "main"             # "main", "ablation_80ep" or "autoguidance_b"
    model: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)  # extra LightningDiT arguments
    # objective
    delta_t: float = 0.3
    semantic_weight: float = 2.0
    use_cosine_loss: bool = True
    repa_weight: float | None = None
    repa_type: str | None = None
    repa_depth: int | None = None
    class_dropout: float = 0.1
    latent_multiplier: float = 1.0
    # optimisation
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    adam_eps: float = 1e-8
    grad_clip: float = 0.0           # 0: no clipping (official); the norm is logged either way
    global_batch: int = 256
    max_steps: int | None = None
    ema_decay: float = 0.9999
    seed: int = 0
    # checkpoints and logs
    ckpt_every: int | None = None
    keep_last: int = 2
    keep_every: int | None = None    # also keep every multiple of this step (0: none)
    log_every: int = 100
    tensorboard: bool = True         # <out_url>/tensorboard on local storage (skipped for remote out_url)
    # execution
    device: str | None = None        # "cuda", "cpu" or None (CUDA when available)
    precision: str = "bf16"          # "bf16": autocast on CUDA (fp32 master weights; CPU runs fp32) | "fp32"
    compile: bool = False
    data_streams: int = 0            # micro-batches per global batch (0: world size); fixes the data order
    loader_workers: int = 4          # DataLoader workers per rank
    shuffle_window: int = 4096       # samples shuffled together (whole chunks; see sfd_core.latent_data)
    peak_tflops: float = 0.0         # accelerator bf16 peak for MFU (0: look up the device name)


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with the recipe's values in every None field, validated."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"Config.recipe: unknown recipe {cfg.recipe!r}; valid: {sorted(RECIPES)}")
    filled = {k: v for k, v in RECIPES[cfg.recipe].items() if getattr(cfg, k) is None}
    resolved = dataclasses.replace(cfg, **filled)
    if not resolved.out_url:
        raise ConfigError("Config.out_url: missing; set the stage output directory (local path or s3://)")
    for name in ("texture_url", "semantic_url"):
        if not getattr(resolved, name):
            raise ConfigError(f"Config.{name}: missing; set the upstream stage directory")
    if resolved.repa_weight > 0 and not resolved.dino_url:
        raise ConfigError("Config.dino_url: REPA is on (repa_weight > 0) and needs the dinov2_features stage dir")
    if resolved.precision not in ("bf16", "fp32"):
        raise ConfigError(f"Config.precision: expected 'bf16' or 'fp32', got {resolved.precision!r}")
    for name in ("global_batch", "max_steps", "ckpt_every", "log_every", "keep_last"):
        if getattr(resolved, name) < 1:
            raise ConfigError(f"Config.{name}: must be >= 1, got {getattr(resolved, name)}")
    return resolved


# --------------------------------------------------------------------------------------------- compute

def train_flops_per_image(kwargs: Mapping[str, Any]) -> float:
    """Training FLOPs per image (3 x forward; matmuls only, a multiply-add = 2 FLOPs) of a LightningDiT
    from its constructor arguments (``sfd_core.models.model_config``)."""
    hidden, depth = kwargs["hidden_size"], kwargs["depth"]
    patch, channels = kwargs["patch_size"], kwargs["in_channels"]
    tokens = (kwargs["input_size"] // patch) ** 2
    ffn = int(2 / 3 * int(hidden * kwargs["mlp_ratio"]))
    block = (2 * tokens * 3 * hidden * hidden          # qkv
             + 2 * 2 * tokens * tokens * hidden        # QK^T and AV
             + 2 * tokens * hidden * hidden            # proj
             + 2 * tokens * 3 * hidden * ffn           # SwiGLU w12 (2F) + w3 (F)
             + 2 * hidden * 6 * hidden)                # adaLN, once per image
    half = hidden // 2 if kwargs.get("semantic_channels", 0) > 0 else hidden
    embedders = (2 if half != hidden else 1) * 2 * (256 * half + half * half)
    outside = (2 * tokens * channels * patch * patch * hidden * 2  # patch embed + final linear
               + 2 * hidden * 2 * hidden + embedders)
    repa = 0
    if kwargs.get("use_repa"):
        r, d = kwargs["repa_projector_dim"], kwargs["repa_out_dim"]
        repa = 2 * tokens * (hidden * r + r * r + r * d)
    return 3.0 * (depth * block + outside + repa)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """bf16 peak FLOP/s of ``device`` (0 when unknown, e.g. on CPU: MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), 0.0)


class SFDTrainer:
    """Model, EMA, optimizer and one optimisation step; ``run`` and ``benchmarks/loader.py`` use it."""

    def __init__(self, cfg: Config, model_kwargs: Mapping[str, Any], device: torch.device, distributed: bool):
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg.model, **model_kwargs).to(device)
        self.model.train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.distributed = distributed
        if distributed:
            self.wrapped: nn.Module = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.wrapped = self.model
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        trainable = [(p, e) for p, e in zip(self.model.parameters(), self.ema.parameters()) if p.requires_grad]
        self.params = [p for p, _ in trainable]
        # AdamW then the EMA, one Triton launch on CUDA; ``optimizer`` (torch's AdamW) holds the state
        self.update = AdamWWithEMA(self.params, [e for _, e in trainable], lr=cfg.lr, betas=tuple(cfg.betas),
                                   eps=cfg.adam_eps, weight_decay=cfg.weight_decay, ema_decay=cfg.ema_decay,
                                   fused=device.type == "cuda")
        self.optimizer = self.update.optimizer
        self.loss_cfg = LossConfig(delta_t=cfg.delta_t, semantic_channels=self.model.semantic_channels,
                                   semantic_weight=cfg.semantic_weight, use_cosine_loss=cfg.use_cosine_loss,
                                   repa_weight=cfg.repa_weight, repa_type=cfg.repa_type)
        self.autocast_bf16 = cfg.precision == "bf16" and device.type == "cuda"

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_bf16 else nullcontext()

    def train_step(self, micro_batches: Sequence[tuple], generators: Sequence[torch.Generator]
                   ) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` [(x, labels, dino or None), ...], micro-batch i drawing
        its label dropout, times and noise from ``generators[i]`` (CPU). Returns [loss, mse, cos, repa,
        grad_norm] on the device (no host sync)."""
        self.update.zero_grad()
        count = len(micro_batches)
        terms = torch.zeros(4, device=self.device)
        for i, ((x, labels, dino), generator) in enumerate(zip(micro_batches, generators)):
            x = x.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            dino = dino.to(self.device, non_blocking=True) if dino is not None else None
            drop = None
            if self.cfg.class_dropout > 0:
                drop = (torch.rand(x.shape[0], generator=generator) < self.cfg.class_dropout).to(self.device)

            def forward(x_t, t, y, _drop=drop):
                return self.forward_model(x_t, t, y, drop_labels=_drop)

            last = i == count - 1
            sync = nullcontext() if (last or not self.distributed) else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    out = sfd_training_loss(forward, x, labels, dino, self.loss_cfg, generator)
                (out["loss"] / count).backward()
            terms += torch.stack([out["loss"], out["mse"], out["cos"], out["repa"]]).detach().float()
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.update.step()
        return torch.cat([terms / count, grad_norm.detach().float().view(1).to(self.device)])

    def load(self, ckpt_url: str, state: Mapping[str, Any]) -> None:
        load_model_weights(self.model, ckpt_url, MODEL_FILE)
        load_model_weights(self.ema, ckpt_url, EMA_FILE)
        self.optimizer.load_state_dict(state["optimizer"])


# ----------------------------------------------------------------------------------------------- data

def _manifest(url: str, what: str) -> dict[str, Any]:
    manifest = read_success(url)
    if manifest is None:
        raise ConfigError(f"Config.{what}: {url} has no _SUCCESS.json; run that stage first")
    return manifest


def _stats_of(manifest: Mapping[str, Any], key: str, array_url_: str, seed: int) -> dict[str, list[float]]:
    stats = (manifest.get("stats") or {}).get(key) or {}
    if "mean" in stats and "std" in stats:
        return {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}
    log(f"{array_url_}: no {key} stats in the manifest; computing them")
    computed = channel_stats(open_array(array_url_), seed=seed)
    return {"mean": computed["mean"], "std": computed["std"]}


@dataclass(frozen=True)
class TrainingData:
    sources: LatentSources
    model_overrides: dict[str, Any]     # shape-dependent LightningDiT arguments (+ the user's overrides)
    upstream: dict[str, str]            # asset -> fingerprint
    standins: bool


def describe_data(cfg: Config) -> TrainingData:
    """Upstream manifests, latent stats and the model arguments the data shapes dictate."""
    manifests = {"texture_latents": _manifest(cfg.texture_url, "texture_url"),
                 "semantic_latents": _manifest(cfg.semantic_url, "semantic_url")}
    use_repa = cfg.repa_weight > 0
    if use_repa:
        manifests["dinov2_features"] = _manifest(cfg.dino_url, "dino_url")
    texture = open_array(array_url(cfg.texture_url, FEATURES_STORE, "texture"))
    semantic = open_array(array_url(cfg.semantic_url, LATENTS_STORE, "semantic"))
    tex_stats = _stats_of(manifests["texture_latents"], "texture",
                          array_url(cfg.texture_url, FEATURES_STORE, "texture"), cfg.seed)
    sem_stats = _stats_of(manifests["semantic_latents"], "semantic",
                          array_url(cfg.semantic_url, LATENTS_STORE, "semantic"), cfg.seed)
    overrides: dict[str, Any] = {
        "in_channels": int(texture.shape[1] + semantic.shape[1]), "semantic_channels": int(semantic.shape[1]),
        "input_size": int(texture.shape[2]), "class_dropout_prob": cfg.class_dropout, "use_repa": use_repa,
        "repa_depth": cfg.repa_depth}
    if use_repa:
        overrides["repa_out_dim"] = int(open_array(array_url(cfg.dino_url, FEATURES_STORE, "dino")).shape[1])
    overrides.update(cfg.model_overrides)
    sources = LatentSources(texture_url=cfg.texture_url, semantic_url=cfg.semantic_url,
                            dino_url=cfg.dino_url if use_repa else None, texture_stats=tex_stats,
                            semantic_stats=sem_stats, latent_multiplier=cfg.latent_multiplier)
    return TrainingData(sources=sources, model_overrides=overrides,
                        upstream={k: str(m.get("fingerprint", "")) for k, m in manifests.items()},
                        standins=any(bool(m.get("standins")) for m in manifests.values()))


def _check_labels(sources: LatentSources, num_classes: int) -> None:
    labels = np.asarray(open_array(sources.labels_url())[:])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels span [{labels.min()}, {labels.max()}] but the model has {num_classes} classes; "
                          "set model_overrides.num_classes")


# ------------------------------------------------------------------------------------------------ run

def _tensorboard_writer(cfg: Config):
    if not (cfg.tensorboard and fs.is_local(cfg.out_url)):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        log("tensorboard is not installed; metrics go to the log only")
        return None
    return SummaryWriter(log_dir=fs.filesystem(fs.join(cfg.out_url, "tensorboard"))[1])


def _stage_name(out_url: str) -> str:
    # The output dir is <root>/<asset>/<fingerprint>; this program builds two assets.
    parent = fs.basename(out_url.rstrip("/").rsplit("/", 1)[0]) if "/" in out_url.rstrip("/") else ""
    return parent if parent in ("sfd_model", "autoguidance_model") else STAGE


def run(cfg: Config) -> dict[str, Any]:
    cfg = resolve_config(cfg)
    done = finished_manifest("train_sfd", cfg.out_url)
    if done is not None:
        return done
    return dist_utils.run_in_process_group(cfg.device, lambda info: _train(cfg, info))


def _train(cfg: Config, info: dist_utils.DistInfo) -> dict[str, Any]:
    dist_utils.seed_everything(cfg.seed, info.rank)
    data = describe_data(cfg)
    model_kwargs = model_config(cfg.model, **data.model_overrides)
    _check_labels(data.sources, model_kwargs["num_classes"])
    num_streams = cfg.data_streams or info.world_size
    if cfg.global_batch % num_streams:
        raise ConfigError(f"Config.global_batch {cfg.global_batch} must be a multiple of the data streams "
                          f"({num_streams})")
    local_streams = streams_of_rank(num_streams, info.rank, info.world_size)
    plan = sfd_plan(data.sources, cfg.global_batch // num_streams, num_streams, cfg.seed, cfg.shuffle_window)
    trainer = SFDTrainer(cfg, data.model_overrides, info.device, info.world_size > 1)
    generators = StreamGenerators(cfg.seed, local_streams)  # CPU: transport draws there, then moves
    curve = LossCurve()
    window = MetricWindow(5, info.device)
    run_ckpts = RunCheckpoints(fs.join(cfg.out_url, "checkpoints"), info.rank, info.world_size, num_streams,
                               generators, window, curve, cfg.keep_last, cfg.keep_every)
    step, position = 0, {"epoch": 0, "position": 0}
    resumed = run_ckpts.resume()
    if resumed is not None:
        latest, state = resumed
        trainer.load(latest, state)
        step, position = int(state["step"]), dict(state["data"])
        log(f"train_sfd: resumed from {latest} (step {step}, epoch {position['epoch']})")

    datasets = [SFDLatentDataset(data.sources, plan, s) for s in local_streams]
    batches = StreamBatches(datasets, cfg.loader_workers, position["epoch"], position["position"])
    writer = _tensorboard_writer(cfg) if info.is_main else None
    flops = train_flops_per_image(model_kwargs)
    peak = peak_flops(info.device, cfg.peak_tflops)
    params = sum(p.numel() for p in trainer.model.parameters())
    log(f"train_sfd: {cfg.model} ({params / 1e6:.2f} M params, {flops / 1e9:.1f} GFLOPs/img train), "
        f"{plan.num_samples} samples, global batch {cfg.global_batch} = {num_streams} streams x "
        f"{plan.batch_size}, world {info.world_size}, steps {step} -> {cfg.max_steps}")

    # Enough, with the weights, to sample from a checkpoint while training runs (pipelines.checkpoints).
    checkpoint_info = {"model": {"name": cfg.model, "overrides": dict(data.model_overrides)},
                       "delta_t": cfg.delta_t, "latent_multiplier": cfg.latent_multiplier}
    throughput = {"img_per_s": 0.0, "mfu": 0.0}

    def save(at_step: int) -> None:
        url = run_ckpts.save(at_step, trainer.model, trainer.optimizer, batches.state_dict(), ema=trainer.ema,
                             info=checkpoint_info)
        log(f"train_sfd: checkpoint {url}")

    window_start, window_steps = time.perf_counter(), 0
    try:
        with dist_utils.StopOnSignal() as stop:
            while step < cfg.max_steps:
                window.add(trainer.train_step(next(batches), generators.ordered()))
                step += 1
                window_steps += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    means = window.reduce()  # syncs the device
                    elapsed = time.perf_counter() - window_start
                    img_per_s = window_steps * cfg.global_batch / elapsed if elapsed > 0 else 0.0
                    mfu = img_per_s * flops / (peak * info.world_size) if peak > 0 else 0.0
                    throughput = {"img_per_s": img_per_s, "mfu": mfu}
                    values = dict(loss=means[0], mse=means[1], cos=means[2], repa=means[3], grad_norm=means[4],
                                  lr=trainer.optimizer.param_groups[0]["lr"], img_per_s=img_per_s, mfu=mfu,
                                  epoch=batches.epoch)
                    metric(step, **values)
                    if writer is not None:
                        for key, value in values.items():
                            writer.add_scalar(f"train/{key}", value, step)
                    curve.record(step, means[0])
                    window_start, window_steps = time.perf_counter(), 0
                stop_now = step % STOP_CHECK_EVERY == 0 and stop.requested(info.device)
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop_now:
                    save(step)
                if stop_now:
                    raise TrainingInterrupted(f"stopped by a signal at step {step}; checkpoint written")
    finally:
        batches.close()
        if writer is not None:
            writer.close()
    if run_ckpts.last_saved != step:
        save(step)

    if info.is_main:
        manifest = _manifest_for(cfg, data, model_kwargs, run_ckpts.ckpt_dir, curve, throughput, plan.num_samples,
                                 params)
        write_success(cfg.out_url, manifest)
    dist_utils.barrier()
    return read_success(cfg.out_url)


def _manifest_for(cfg: Config, data: TrainingData, model_kwargs: Mapping[str, Any], ckpt_dir: str,
                  curve: LossCurve, throughput: Mapping[str, float], num_samples: int, params: int
                  ) -> dict[str, Any]:
    newest = latest_complete(ckpt_dir)
    artifacts = {"checkpoint": newest, "model": fs.join(newest, MODEL_FILE), "ema": fs.join(newest, EMA_FILE)}
    if _tensorboard_writer_dir_exists(cfg):
        artifacts["tensorboard"] = fs.join(cfg.out_url, "tensorboard")
    summary = curve.summary()
    return {
        "stage": _stage_name(cfg.out_url), "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url,
        "code_version": CODE_VERSION, "config": dataclasses.asdict(cfg), "upstream": data.upstream,
        "standins": data.standins,
        "counts": {"steps": cfg.max_steps, "images_seen": cfg.max_steps * cfg.global_batch,
                   "train_samples": num_samples, "checkpoints": len(complete_steps(ckpt_dir))},
        "model": {"name": cfg.model, "overrides": dict(data.model_overrides), "params": params,
                  "train_flops_per_image": train_flops_per_image(model_kwargs)},
        "artifacts": artifacts,
        "stats": {"texture": dict(data.sources.texture_stats), "semantic": dict(data.sources.semantic_stats)},
        "metrics": {"final_loss": summary.get("last", 0.0), "loss_curve": summary, **throughput},
    }


def _tensorboard_writer_dir_exists(cfg: Config) -> bool:
    return cfg.tensorboard and fs.is_local(cfg.out_url) and fs.exists(fs.join(cfg.out_url, "tensorboard"))


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(Config, argv, description=__doc__.splitlines()[0])
    dist_utils.main_until_interrupted("train_sfd", lambda: run(cfg))


if __name__ == "__main__":
    main()
