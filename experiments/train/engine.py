"""Training and evaluation loops (DeiT's ``engine.py`` role): built objects in, metric dicts out.

The engine knows the method interface only: ``model(images) -> MethodOutput``, ``model.loss_terms(...)``,
``model.after_optimizer_step()``, ``model.needs_teacher`` and, in evaluation, the ``alt_token_counts(images, out)``
hook. It never asks for a method's name and writes no files.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from experiments.records.token_maps import encode_maps
from experiments.train.metrics import compute_metrics

log = logging.getLogger(__name__)
EVAL_OUTPUTS = ("correct1", "correct5", "loss")  # the per-image results the metric functions read


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; names the epoch and step."""


@dataclass
class TrainSettings:
    clip_grad: Optional[float] = 1.0
    label_smoothing: float = 0.0
    nan_policy: str = "stop"  # "stop" raises; "skip_step" drops the update and counts it
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype on CUDA, None for fp32
    progress: bool = True


@dataclass
class EpochState:
    """Where an epoch stands: steps done and the running sums behind its metrics. A mid-epoch checkpoint saves it;
    ``train_one_epoch(state=...)`` continues from it (the loader must then yield the remaining batches only)."""

    step: int = 0
    samples: int = 0
    skipped: int = 0
    sums: dict[str, float] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The method behind a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    epoch: int,
    device: torch.device,
    settings: TrainSettings,
    teacher: Optional[nn.Module] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    on_step: Optional[Callable[[EpochState], None]] = None,
    state: Optional[EpochState] = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss terms, the last lr and the number of skipped steps.

    ``on_step(state)`` runs after every step (the pipeline checkpoints there on a preemption signal). ``state``
    resumes a partly done epoch: ``loader`` yields the batches from ``state.step`` on, ``len(loader)`` is the full
    epoch's.
    """
    model.train()
    method = unwrap(model)
    state = state if state is not None else EpochState()
    sums = state.sums
    steps_per_epoch = len(loader)
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=not settings.progress, initial=state.step,
               total=steps_per_epoch)
    for step, (images, targets) in enumerate(bar, start=state.step):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, settings.amp_dtype):
            out = model(images)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = teacher(images)
            terms = {"task": F.cross_entropy(out.logits.float(), targets, label_smoothing=settings.label_smoothing)}
            terms.update(method.loss_terms(out, targets, teacher_out))
            loss = sum(terms.values())
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            if settings.nan_policy != "skip_step":
                raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step} ({detail})")
            log.warning("skipping step %d of epoch %d: non-finite loss (%s)", step, epoch, detail)
            optimizer.zero_grad(set_to_none=True)
            state.skipped += 1
            state.step = step + 1
            if on_step is not None:
                on_step(state)
            continue
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if settings.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        method.after_optimizer_step()
        if scheduler is not None:
            scheduler.step_update(num_updates=epoch * steps_per_epoch + step + 1)
        batch = images.shape[0]
        state.samples += batch
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item() * batch
        sums["loss"] = sums.get("loss", 0.0) + loss.item() * batch
        bar.set_postfix(loss=f"{loss.item():.3f}")
        state.step = step + 1
        if on_step is not None:
            on_step(state)
    metrics = {name: total / max(state.samples, 1) for name, total in sums.items()}
    metrics["lr"] = max(group["lr"] for group in optimizer.param_groups)
    metrics["skipped_steps"] = state.skipped
    return metrics


@dataclass
class EvalResult:
    """Evaluation metrics plus the per-image token statistics that FLOPs and the analysis are built on."""

    metrics: dict[str, float]
    token_counts: Tensor  # [images, depth, 2] long, CPU
    patch_depth: Tensor  # [images, num_patches] long, CPU
    alt_token_counts: dict[str, Tensor] = field(default_factory=dict)
    map_images: Optional[Tensor] = None  # the first few eval images, for depth-map figures
    correct1: Optional[Tensor] = None  # [images] bool, CPU: top-1 right per image (accuracy per compute bin)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             keep_images: int = 0, progress: bool = True,
             merge: Optional[Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = None) -> EvalResult:
    """The registered metrics (``experiments/train/metrics.py``: top-1/top-5, mean loss...) and per-image token
    counts over ``loader`` in eval mode (physical removal).

    Every batch gives per-image results; the metrics are computed once from them, joined in batch order. A sharded
    evaluation passes ``merge`` (``distributed.merge_batches``), which puts every rank's batches back in that
    order, so its metrics equal the single-process ones exactly.
    """
    model.eval()
    method = unwrap(model)
    parts: list[dict[str, Any]] = []
    keep_batches = 0
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(images)
        logits = out.logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        part = {
            "correct1": (top[:, 0] == targets).cpu(),
            "correct5": (top == targets[:, None]).any(dim=1).cpu(),
            "loss": F.cross_entropy(logits, targets, reduction="none").cpu(),
            "token_counts": out.token_counts.cpu(),
            "patch_depth": out.patch_depth.cpu(),
            # outside the autocast block; the hook may re-run part of the batch (A-ViT eval)
            "alt": {name: value.cpu() for name, value in method.alt_token_counts(images, out).items()},
        }
        if keep_images:
            keep_batches = keep_batches or math.ceil(keep_images / images.shape[0])
            if len(parts) < keep_batches:  # enough for the first keep_images of the whole pass, in any shard
                part["images"] = images[:keep_images].cpu()
        parts.append(part)
    if merge is not None:
        parts = merge(parts)
    total = sum(len(p["correct1"]) for p in parts)
    if total == 0:
        raise ValueError("evaluation set is empty")
    kept: list[Tensor] = []
    for part in parts:
        have = sum(len(k) for k in kept)
        if have >= keep_images or "images" not in part:
            break
        kept.append(part["images"][: keep_images - have])
    outputs = {key: torch.cat([p[key] for p in parts]) for key in EVAL_OUTPUTS}
    metrics = compute_metrics(outputs)
    alt = {name: torch.cat([p["alt"][name] for p in parts]) for name in parts[0]["alt"]}
    return EvalResult(metrics, torch.cat([p["token_counts"] for p in parts]),
                      torch.cat([p["patch_depth"] for p in parts]), alt, torch.cat(kept) if kept else None,
                      outputs["correct1"])


def token_summary(result: EvalResult, depth: int, grid: Optional[tuple[int, ...]], map_count: int,
                  moving: Optional[Tensor] = None, objects: Optional[Tensor] = None,
                  masks: Optional[Tensor] = None) -> dict[str, Any]:
    """Per-block mean counts, the patch-depth histogram, the mean depth per patch and a few depth maps; with
    ``moving`` (``[N, P]`` bool: the data's moving-region tokens, video data whose pixels change between frames)
    also ``motion``: the moving
    tokens' share of all patch tokens and their share of the patch depth summed over tokens (the blocks
    spent on them: per-token compute, attention's quadratic part aside); with ``objects`` (``[N, P]`` bool: the
    data's ground-truth object tokens, ``data=digit_scenes``) also ``objects``: :func:`object_scores`, and each
    depth map its image's ``object_tokens``; with ``masks`` (``[n, H, W]`` bool: the object masks of the first
    ``n`` eval images) each depth map of those images also its ``object_mask`` at the thumbnail's resolution
    (a thumbnail pixel is object when at least half of the pixels it covers are)."""
    counts = result.token_counts.double()
    summary: dict[str, Any] = {
        "attn_mean": counts[:, :, 0].mean(0).tolist(),
        "mlp_mean": counts[:, :, 1].mean(0).tolist(),
        "depth_histogram": torch.bincount(result.patch_depth.flatten(), minlength=depth + 1).tolist(),
        "mean_patch_depth": result.patch_depth.double().mean(0).tolist(),
        "grid": list(grid) if grid else None,
    }
    if moving is not None:
        weights = result.patch_depth.double()
        summary["motion"] = {"token_share": moving.double().mean().item(),
                             "depth_share": (weights * moving).sum().item() / max(weights.sum().item(), 1e-12),
                             "mean_depth_moving": weights[moving].mean().item() if moving.any() else None,
                             "mean_depth_static": weights[~moving].mean().item() if (~moving).any() else None}
    if objects is not None:
        summary["objects"] = object_scores(result.patch_depth, objects, depth)
    if result.map_images is not None and map_count:
        images = filmstrip(result.map_images[:map_count].float(), grid)
        side = _thumb_size(images.shape[-2])
        thumbs = F.interpolate(images, size=(side, side * images.shape[-1] // images.shape[-2]), mode="area")
        low, high = thumbs.amin(dim=(1, 2, 3), keepdim=True), thumbs.amax(dim=(1, 2, 3), keepdim=True)
        thumbs = ((thumbs - low) / (high - low).clamp_min(1e-6) * 255).round().to(torch.uint8)
        count = len(images)
        object_masks = None
        if masks is not None and len(masks) >= count:
            shrunk = F.interpolate(masks[:count, None].float(), size=thumbs.shape[-2:], mode="area")
            object_masks = (shrunk[:, 0] >= 0.5).numpy()
        summary["maps"] = encode_maps(result.patch_depth[:count].numpy(), thumbs.permute(0, 2, 3, 1).numpy(), grid,
                                      object_masks, objects[:count].numpy() if objects is not None else None)
    return summary


def object_scores(patch_depth: Tensor, objects: Tensor, depth: int) -> dict[str, Any]:
    """How a method's tokens follow the ground truth (``patch_depth`` and ``objects``: ``[N, P]``):

    - ``object_recall``: the share of object tokens that reach the last block (``patch_depth == depth``). A token
      counts as kept while it is a token of its own: for merging methods that is the representative of its group
      (the ToMe convention of ``MethodOutput.patch_depth``), a token merged or fused into another is gone;
    - ``background_compute``: the share of the patch depth summed over tokens (blocks run on each) spent on
      background tokens, next to ``background_share``, the background's share of the tokens (dense: the two
      are equal);
    - ``mean_depth_object`` / ``mean_depth_background``: the mean blocks run per object / background token."""
    weights, objects = patch_depth.double(), objects.bool()
    total = max(weights.sum().item(), 1e-12)
    return {"object_share": objects.double().mean().item(), "background_share": (~objects).double().mean().item(),
            "object_recall": (patch_depth[objects] >= depth).double().mean().item() if objects.any() else None,
            "background_compute": (weights * ~objects).sum().item() / total,
            "mean_depth_object": weights[objects].mean().item() if objects.any() else None,
            "mean_depth_background": weights[~objects].mean().item() if (~objects).any() else None}


def filmstrip(images: Tensor, grid: Optional[Sequence[int]]) -> Tensor:
    """Clips ``[n, C, T, H, W]`` as ``[n, C, H, T' * W]``: the first frame of each of the grid's ``T'`` time
    slots (tubelets), side by side; images ``[n, C, H, W]`` pass unchanged."""
    if images.ndim != 5:
        return images
    slots = int(grid[0]) if grid is not None and len(grid) == 3 else images.shape[2]
    frames = images[:, :, :: images.shape[2] // slots][:, :, :slots]
    n, channels, _, height, width = frames.shape
    return frames.permute(0, 1, 3, 2, 4).reshape(n, channels, height, slots * width)


def _thumb_size(size: int) -> int:
    """Thumbnail side in px: the image's own, at most 64 (over 4 px a patch of a 14x14 grid; keeps records small)."""
    return min(size, 64)
