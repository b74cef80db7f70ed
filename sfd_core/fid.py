"""FID stage (``python -m sfd_core.fid``): Inception statistics of real images, and the metrics report.

Two modes share one config:
- ``reference``: Inception pool3 statistics (mu, sigma; float64) of the real images of an ``imagenet_shards``
  stage, or imported from an ADM reference batch ``.npz`` (its mu/sigma as given; its ``arr_0`` images, when
  present, give the pool features for precision/recall and KID). Writes ``reference_stats.npz``.
- ``report``: FID, IS, KID (torch-fidelity's formulas on torch-fidelity's TF-compatible Inception) and
  precision/recall (the ADM k-NN manifold estimate on pool3 features, k=3, implemented here) of the images of an
  ``sfd_samples`` stage against a reference; writes ``metrics.json``, ``report.md`` and a copy of the grid.

Images go to the Inception as uint8 CHW tensors from a ``Dataset`` (the extractor resizes to 299 like TF).
Features are extracted once and every metric is computed from them. Weights come from a local file (or URL)
in torch-fidelity's format; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import scipy.linalg
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from sfd_core.config import ConfigError, load_config
from sfd_core.encoders.inception import build_inception, resolve_inception_weights
from sfd_core.imaging import load_rgb_array
from sfd_core.reporting import Progress, log
from sfd_core.stage_output import finished_manifest
from storage import fs
from storage.manifest import read_success, write_success
from storage.shards import iter_shard

CODE_VERSION = "1"  # pipelines.stages.STAGES[...].code_version of both FID assets
STAGE_REFERENCE = "fid_reference"
STAGE_REPORT = "fid_report"
MODES = ("reference", "report")
POOL_FEATURE = "2048"                 # pool3, the FID / KID / precision-recall space (ADM's pool_3)
LOGITS_FEATURE = "logits_unbiased"    # IS logits (torch-fidelity's default for inception-v3-compat)
POOL_DIM = 2048
REFERENCE_FILE = "reference_stats.npz"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


@dataclass
class Config:
    """FID stage: ``mode`` "reference" (real-image statistics) or "report" (metrics of generated samples)."""

    mode: str = "report"
    out_url: str = ""
    inception_weights: str = ""       # torch-fidelity Inception weights (.pth); empty: the torch hub cache copy
    standins: bool = False            # the Inception above is a random-init stand-in
    device: str = "auto"              # "auto" (CUDA when available), "cuda", "cpu"
    batch_size: int = 64
    num_workers: int = 0              # image-decoding DataLoader workers
    # reference mode: one of the two sources
    shards_url: str = ""              # imagenet_shards stage dir (its manifest lists the shard URLs)
    adm_npz_url: str = ""             # ADM reference batch (mu, sigma [, arr_0])
    max_reference_images: int = 0     # 0: every image of the shard set
    reference_pool_features: int = 10000  # pool features kept for precision/recall and KID (ADM keeps 10k)
    # report mode
    samples_url: str = ""             # sfd_samples stage dir
    reference_url: str = ""           # fid_reference stage dir
    prc_neighborhood: int = 3         # k of the k-NN manifold (ADM: 3)
    prc_batch_size: int = 10000       # rows per distance block
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000       # lowered to the smaller set size when needed
    seed: int = 2020                  # IS split shuffle / KID subsets (torch-fidelity's default)


# ------------------------------------------------------------------------------------------ Inception

def load_inception(weights_path: str, device: torch.device | str = "cpu"):
    """torch-fidelity's TF-compatible InceptionV3 giving pool3 features and unbiased logits, weights from a
    local file (never fetched). Returns (extractor, sha256 of the weights file)."""
    path = resolve_inception_weights(weights_path or None, config_field="inception_weights")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return build_inception(path, (POOL_FEATURE, LOGITS_FEATURE)).to(device), digest.hexdigest()


# ---------------------------------------------------------------------------------------- image sources

class ArrayImages(Dataset):
    """uint8 [N, H, W, 3] images -> uint8 [3, H, W] tensors (the input torch-fidelity's extractors take)."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)


def _image_bytes(sample: dict[str, Any], url: str) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"{url}: sample {sample['__key__']!r} has no image ({'/'.join(IMAGE_EXTENSIONS)})")


class ShardImages(IterableDataset):
    """Images of WebDataset shards as ``(ordinal, uint8 [3, H, W])``; ordinal = shard number * 10^9 + position,
    so callers can restore shard order whatever the number of DataLoader workers (shards are split over them)."""

    def __init__(self, shard_urls: list[str]):
        self.shard_urls = list(shard_urls)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        worker = get_worker_info()
        picked = range(len(self.shard_urls))
        if worker is not None:
            picked = picked[worker.id::worker.num_workers]
        for shard in picked:
            url = self.shard_urls[shard]
            for position, sample in enumerate(iter_shard(url)):
                image = load_rgb_array(_image_bytes(sample, url))
                # np.array: a writable copy (PIL's arrays are read-only, which torch warns about).
                yield shard * 10**9 + position, torch.from_numpy(np.array(image)).permute(2, 0, 1)


def image_batches(dataset: Dataset | IterableDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


# --------------------------------------------------------------------------------------- features, stats

@torch.no_grad()
def iter_features(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], extractor, device,
                  limit: int = 0, desc: str = "inception") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ordinals, pool3 float32 [B, 2048], IS logits float32 [B, 1008]) per batch, up to ``limit`` images."""
    progress = Progress(limit or None, desc, unit="img")
    seen = 0
    for ordinals, images in batches:
        if limit:
            keep = min(len(images), limit - seen)
            ordinals, images = ordinals[:keep], images[:keep]
        pool, logits = extractor(images.to(device, non_blocking=True))
        seen += len(images)
        progress.update(len(images))
        yield ordinals.numpy(), pool.float().cpu().numpy(), logits.float().cpu().numpy()
        if limit and seen >= limit:
            return


def extract_all(batches, extractor, device, desc: str = "inception") -> dict[str, np.ndarray]:
    """All features of an image source, in ordinal order: {"pool": [N, 2048], "logits": [N, 1008]}."""
    ordinals, pools, logits = [], [], []
    for o, p, lg in iter_features(batches, extractor, device, desc=desc):
        ordinals.append(o), pools.append(p), logits.append(lg)
    if not pools:
        raise ValueError(f"{desc}: no images found")
    order = np.argsort(np.concatenate(ordinals), kind="stable")
    return {"pool": np.concatenate(pools)[order], "logits": np.concatenate(logits)[order]}


class RunningMoments:
    """Streaming mean and (N-1)-normalised covariance in float64 (equal to ``np.cov(x, rowvar=False)``),
    accumulated on ``device`` so a million pool vectors cost seconds on a GPU.

    Sums are taken around a fixed shift (the first batch's mean) so the final subtraction stays well conditioned."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.device = torch.device(device)
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        x = torch.as_tensor(features).to(self.device, torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
        centered = x - self.shift
        self.count += len(x)
        self.total += centered.sum(dim=0)
        self.outer += centered.T @ centered

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.count}")
        mean_centered = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mean_centered, mean_centered)) / (self.count - 1)
        return (self.shift + mean_centered).cpu().numpy(), sigma.cpu().numpy()


def feature_statistics(features: np.ndarray, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of [N, D] features."""
    moments = RunningMoments(features.shape[1], device)
    moments.update(features)
    return moments.statistics()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64 (any input dtype).

    The trace term is torch-fidelity's (sum of square roots of the eigenvalues of S1 S2), taken from the
    symmetric matrix S2^1/2 S1 S2^1/2, which has the same eigenvalues for covariances: two symmetric
    eigendecompositions instead of a nonsymmetric one, several times faster at 2048-d and free of complex
    round-off. Tests hold it to torch-fidelity's own function and to a scipy sqrtm reference."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    eigenvalues, eigenvectors = scipy.linalg.eigh(sigma2, driver="evd")
    root2 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    inner = root2 @ sigma1 @ root2
    product_eigenvalues = scipy.linalg.eigvalsh((inner + inner.T) / 2.0, driver="evd")
    trace_sqrt_product = np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


# ----------------------------------------------------------------------------------- precision / recall

def _squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    # |u|^2 - 2 u.v + |v|^2, clamped at 0 as ADM's DistanceBlock does (rounding can make it slightly negative).
    d = rows.pow(2).sum(1, keepdim=True) - 2.0 * rows @ cols.T + cols.pow(2).sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point (the point itself is its 0th)."""
    if len(features) <= k:
        raise ValueError(f"a {k}-NN manifold needs more than {k} points, got {len(features)}")
    return torch.cat([_squared_distances(rows, features).kthvalue(k + 1, dim=1).values
                      for rows in features.split(batch_size)])


def inside_manifold(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor,
                    batch_size: int = 10000) -> torch.Tensor:
    """[len(points)] bool: inside at least one ball (center, radius) of the manifold, boundary included."""
    inside = []
    for rows in points.split(batch_size):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for start in range(0, len(centers), batch_size):
            block = _squared_distances(rows, centers[start:start + batch_size])
            hit |= (block <= radii[start:start + batch_size].unsqueeze(0)).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch_size: int = 10000, device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.), as ADM's evaluator computes it on pool3 features:
    precision = share of generated points inside the real k-NN manifold, recall = share of real points inside
    the generated one. Computed in float32 like ADM (which even tries float16 distances first)."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = inside_manifold(fake_t, real_t, knn_radii(real_t, k, batch_size), batch_size)
    recall = inside_manifold(real_t, fake_t, knn_radii(fake_t, k, batch_size), batch_size)
    return float(precision.double().mean()), float(recall.double().mean())


# ------------------------------------------------------------------------------------------- metrics

def compute_metrics(sample_features: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    cfg: Config, device: torch.device | str = "cpu") -> dict[str, float]:
    """FID (always), IS (always), KID and precision/recall (when the reference has pool features)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    pool, logits = sample_features["pool"], sample_features["logits"]
    mu, sigma = feature_statistics(pool, device)
    metrics: dict[str, float] = {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "num_samples": float(len(pool)),
    }
    if int(reference["count"]) >= 0:  # an imported ADM batch does not say how many images made its mu/sigma
        metrics["num_reference"] = float(reference["count"])
    isc = isc_features_to_metric(torch.from_numpy(logits), splits=min(cfg.isc_splits, len(logits)),
                                 shuffle=True, rng_seed=cfg.seed)
    metrics["inception_score_mean"] = isc["inception_score_mean"]
    metrics["inception_score_std"] = isc["inception_score_std"]
    ref_pool = reference["pool"]
    if len(ref_pool) > cfg.prc_neighborhood:
        subset = min(cfg.kid_subset_size, len(pool), len(ref_pool))
        kid = kid_features_to_metric(torch.from_numpy(pool), torch.from_numpy(ref_pool.astype(np.float32)),
                                     kid_subsets=cfg.kid_subsets, kid_subset_size=subset, verbose=False,
                                     rng_seed=cfg.seed)
        metrics["kid_mean"] = kid["kernel_inception_distance_mean"]
        metrics["kid_std"] = kid["kernel_inception_distance_std"]
        metrics["kid_subset_size"] = float(subset)
        precision, recall = precision_recall(ref_pool, pool, cfg.prc_neighborhood, cfg.prc_batch_size, device)
        metrics["precision"], metrics["recall"] = precision, recall
        metrics["num_reference_pool"] = float(len(ref_pool))
    return metrics


_METRIC_ROWS = (
    ("fid", "FID (pool3, vs. reference mu/sigma)", "{:.4f}"),
    ("inception_score_mean", "Inception Score", "{:.3f}"),
    ("inception_score_std", "Inception Score (std over splits)", "{:.3f}"),
    ("kid_mean", "KID", "{:.6f}"),
    ("kid_std", "KID (std over subsets)", "{:.6f}"),
    ("precision", "Precision (k-NN manifold, k={k})", "{:.4f}"),
    ("recall", "Recall (k-NN manifold, k={k})", "{:.4f}"),
    ("num_samples", "generated images", "{:.0f}"),
    ("num_reference", "reference images (mu/sigma)", "{:.0f}"),
    ("num_reference_pool", "reference images (precision/recall, KID)", "{:.0f}"),
)


def render_report(metrics: dict[str, float], *, standins: bool, reference_source: str, k: int,
                  grid_name: str | None, samples_uri: str, reference_uri: str) -> str:
    """The Markdown report: a metrics table, what was compared, and a plain warning about stand-ins."""
    lines = ["# SFD sample quality", ""]
    if standins:
        lines += ["> **Stand-in networks were used** (random-init weights for at least one of: Inception, "
                  "texture VAE, diffusion model). These numbers compare only with other runs made with the same "
                  "stand-ins; they are not comparable with published FIDs.", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key, label, fmt in _METRIC_ROWS:
        if key in metrics:
            lines.append(f"| {label.format(k=k)} | {fmt.format(metrics[key])} |")
    if "precision" not in metrics:
        lines += ["", "KID and precision/recall are not available: the reference holds no pool features "
                      "(an ADM batch without `arr_0`)."]
    lines += ["", f"- samples: `{samples_uri}`", f"- reference: `{reference_uri}` ({reference_source})",
              "- features: torch-fidelity `inception-v3-compat` (TF-compatible InceptionV3); IS/KID by "
              "torch-fidelity; FID in float64 with torch-fidelity's trace term (symmetric eigendecompositions); "
              "precision/recall as in ADM's evaluator."]
    if grid_name:
        lines += ["", f"![samples]({grid_name})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- stages

def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _read_manifest(url: str, what: str) -> dict[str, Any]:
    """The ``_SUCCESS.json`` of a stage dir (or the manifest file itself)."""
    if not url:
        raise ConfigError(f"{what}: set the URL of the upstream stage directory")
    manifest = fs.read_json(url) if url.endswith(".json") else read_success(url)
    if manifest is None:
        raise ConfigError(f"{what}: {url} has no _SUCCESS.json; run that stage first")
    return manifest


def shard_urls(manifest: dict[str, Any]) -> list[str]:
    """Shard URLs of a shard-writing stage (imagenet_shards, sfd_samples): ``artifacts.shards``, in order."""
    shards = (manifest.get("artifacts") or {}).get("shards")
    if not isinstance(shards, list) or not shards:
        raise ConfigError(f"manifest of {manifest.get('stage')} at {manifest.get('uri')} lists no shards")
    return list(shards)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_reference(url: str) -> dict[str, np.ndarray]:
    """``reference_stats.npz`` of a fid_reference stage: mu, sigma (float64), pool (float32 [M, 2048]), count."""
    with np.load(io.BytesIO(fs.read_bytes(url))) as data:
        return {name: data[name] for name in data.files}


def import_adm_reference(npz_url: str, extractor, device, cfg: Config) -> dict[str, np.ndarray]:
    """ADM reference batch: its mu/sigma as float64 (TF Inception pool_3); pool features of its ``arr_0``
    images (if any, up to ``reference_pool_features``) from our Inception for precision/recall and KID."""
    with np.load(io.BytesIO(fs.read_bytes(npz_url))) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ConfigError(f"adm_npz_url: {npz_url} lacks {sorted(missing)} (expected an ADM reference batch)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        images = data["arr_0"][: cfg.reference_pool_features] if "arr_0" in data.files else None
    if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
        raise ConfigError(f"adm_npz_url: mu/sigma shapes {mu.shape}/{sigma.shape}, expected pool3 (2048)")
    pool = np.zeros((0, POOL_DIM), dtype=np.float32)
    if images is not None and len(images):
        loader = image_batches(ArrayImages(images), cfg.batch_size, 0)
        pool = extract_all(loader, extractor, device, desc="reference arr_0")["pool"]
    # ADM's npz does not say how many images made mu/sigma; -1 marks "unknown".
    return {"mu": mu, "sigma": sigma, "pool": pool, "count": np.array(-1)}


def reference_from_shards(urls: list[str], extractor, device, cfg: Config) -> dict[str, np.ndarray]:
    """Streaming mu/sigma over the shard images; the first ``reference_pool_features`` pool vectors kept."""
    moments = RunningMoments(POOL_DIM, device)
    kept: list[np.ndarray] = []
    kept_count = 0
    loader = image_batches(ShardImages(urls), cfg.batch_size, cfg.num_workers)
    for _, pool, _ in iter_features(loader, extractor, device, cfg.max_reference_images, "reference"):
        moments.update(pool)
        if kept_count < cfg.reference_pool_features:
            kept.append(pool[: cfg.reference_pool_features - kept_count])
            kept_count += len(kept[-1])
    mu, sigma = moments.statistics()
    pool = np.concatenate(kept) if kept else np.zeros((0, POOL_DIM), dtype=np.float32)
    return {"mu": mu, "sigma": sigma, "pool": pool, "count": np.array(moments.count)}


def _stage_manifest(cfg: Config, stage: str, **fields: Any) -> dict[str, Any]:
    return {"stage": stage, "fingerprint": fs.basename(cfg.out_url), "uri": cfg.out_url,
            "config": dataclasses.asdict(cfg), "code_version": CODE_VERSION, **fields}


def run_reference(cfg: Config) -> dict[str, Any]:
    if bool(cfg.shards_url) == bool(cfg.adm_npz_url):
        raise ConfigError("reference mode: set exactly one of shards_url (real images) and adm_npz_url")
    device = _resolve_device(cfg.device)
    extractor, inception_sha = load_inception(cfg.inception_weights, device)
    upstream: dict[str, str] = {}
    standins = cfg.standins
    if cfg.shards_url:
        shards_manifest = _read_manifest(cfg.shards_url, "shards_url")
        upstream["imagenet_shards"] = shards_manifest.get("fingerprint", "")
        standins = standins or bool(shards_manifest.get("standins"))
        reference = reference_from_shards(shard_urls(shards_manifest), extractor, device, cfg)
        source = "imagenet_shards"
    else:
        reference = import_adm_reference(cfg.adm_npz_url, extractor, device, cfg)
        source = "adm_npz"
    stats_url = fs.join(cfg.out_url, REFERENCE_FILE)
    fs.write_bytes(stats_url, _npz_bytes(**reference))
    log(f"fid_reference: {source}, {int(reference['count'])} images, {len(reference['pool'])} pool features "
        f"-> {stats_url}")
    manifest = _stage_manifest(
        cfg, STAGE_REFERENCE, counts={"images": int(reference["count"]), "pool_features": len(reference["pool"])},
        stats={"source": source, "inception_sha256": inception_sha}, metrics={},
        artifacts={"reference_stats": stats_url}, upstream=upstream, standins=standins)
    return write_success(cfg.out_url, manifest)


def run_report(cfg: Config) -> dict[str, Any]:
    device = _resolve_device(cfg.device)
    samples_manifest = _read_manifest(cfg.samples_url, "samples_url")
    reference_manifest = _read_manifest(cfg.reference_url, "reference_url")
    extractor, inception_sha = load_inception(cfg.inception_weights, device)
    reference_sha = reference_manifest.get("stats", {}).get("inception_sha256")
    if reference_sha != inception_sha:
        raise ConfigError(f"inception_weights differ from the ones the reference {cfg.reference_url} was made with "
                          f"(sha256 {inception_sha[:12]} vs {str(reference_sha)[:12]}): features would not compare")
    reference = load_reference(reference_manifest["artifacts"]["reference_stats"])
    loader = image_batches(ShardImages(shard_urls(samples_manifest)), cfg.batch_size, cfg.num_workers)
    features = extract_all(loader, extractor, device, desc="samples")
    metrics = compute_metrics(features, reference, cfg, device)
    standins = bool(cfg.standins or samples_manifest.get("standins") or reference_manifest.get("standins"))

    grid_src = samples_manifest.get("artifacts", {}).get("grid")
    grid_name = None
    if grid_src:
        grid_name = "grid.png"
        fs.write_bytes(fs.join(cfg.out_url, grid_name), fs.read_bytes(grid_src))
    report = render_report(metrics, standins=standins, reference_source=reference_manifest["stats"]["source"],
                           k=cfg.prc_neighborhood, grid_name=grid_name, samples_uri=samples_manifest["uri"],
                           reference_uri=reference_manifest["uri"])
    artifacts = {"metrics": fs.join(cfg.out_url, "metrics.json"), "report": fs.join(cfg.out_url, "report.md")}
    if grid_name:
        artifacts["grid"] = fs.join(cfg.out_url, grid_name)
    fs.write_json(artifacts["metrics"], {**metrics, "standins": standins})
    fs.write_bytes(artifacts["report"], report.encode("utf-8"))
    log("fid_report: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    manifest = _stage_manifest(
        cfg, STAGE_REPORT, counts={"samples": int(metrics["num_samples"])}, stats={"inception_sha256": inception_sha},
        metrics=metrics, artifacts=artifacts, standins=standins,
        upstream={"sfd_samples": samples_manifest.get("fingerprint", ""),
                  "fid_reference": reference_manifest.get("fingerprint", "")})
    return write_success(cfg.out_url, manifest)


def run(cfg: Config) -> dict[str, Any]:
    """Run one mode; a stage dir that already holds ``_SUCCESS.json`` is returned as is."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: expected one of {MODES}, got {cfg.mode!r}")
    if not cfg.out_url:
        raise ConfigError("out_url: set the stage output directory")
    done = finished_manifest(f"fid ({cfg.mode})", cfg.out_url)
    if done is not None:
        return done
    return run_reference(cfg) if cfg.mode == "reference" else run_report(cfg)


def main(argv: list[str] | None = None) -> None:
    run(load_config(Config, argv))


if __name__ == "__main__":
    main()
