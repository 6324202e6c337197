"""Fine-tuning (strategies 1 and 2) for data far from ImageNet, feeding the same cache and leaderboard.

fastai's ``fine_tune`` recipe, made explicit: the new linear head trains first with the
backbone frozen, then the top ``unfreeze`` stages (or all) train with discriminative learning
rates (geometric from ``lr_min`` at the earliest stage to ``lr`` at the head), AdamW without
weight decay on norms and biases, a one-cycle schedule, gradient clipping, class weights and
early stopping on validation loss; optionally an average of the weights over the last steps (``ema``),
which validation, early stopping and ``best.pt`` then use. The test split is never read here.

A run folder holds ``best.pt`` / ``last.pt`` (``featx.embed.checkpoints``), ``history.csv`` and
``history.png`` (``featx.comparison.runs``); ``last.pt`` also holds optimiser, scheduler and epoch, so
``--resume`` continues exactly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from featx.data.augment import augmentation
from featx.embed.backbones import get_backbone, resolve_weights
from featx.embed.checkpoints import load_resume_state, save_checkpoint, save_resume_state
from featx.data.datasets import ImageDataset, carve_validation, pseudo_labelled, scan_dataset
from featx.errors import DataError
from featx.finetuning.config import FinetuneConfig
from featx.embed.feature_model import autocast, build_feature_model, gpu_decoding_workers, resolve_device, to_tensor
from featx.embed.hardware import resolve_precision
from featx.heads.registry import load_head
from featx.data.images import ImageError, Preprocess, load_image, open_rgb
from featx.heads.metrics import classification_metrics
from featx.comparison.plots import history_figure, lr_finder_figure, save
from featx.comparison.runs import finetune_file, head_files
from featx.version import __version__
from featx.vocab import STAGE_GROUPS

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    out: Path
    best_epoch: int
    best_metrics: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class Classifier(nn.Module):
    """A feature model plus a new linear head: uint8 images in, logits out. Dropout (training only) has no
    weights, so the head's state is a plain linear layer's, as extraction and the warm start expect."""

    def __init__(self, features: nn.Module, dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging, timm's ModelEma): the weights of
    the last ~1/(1 - decay) steps averaged, less at the mercy of where one run's last steps happened to land.

    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` so the first steps are not averaged with the
    starting weights for long; integer buffers (BatchNorm's step count) follow the model as they are.
    """

    def __init__(self, model: nn.Module, decay: float, state: dict | None = None):
        self.decay = decay
        self.steps = state["steps"] if state else 0
        source = state["weights"] if state else model.state_dict()
        self.weights = {k: v.detach().clone() for k, v in source.items()}

    def update(self, model: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    self.weights[name].lerp_(value, 1 - decay)
                else:
                    self.weights[name].copy_(value)

    @contextmanager
    def applied(self, model: nn.Module):
        """The model holds the averaged weights inside the block, its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "weights": self.weights}


# --- data ---------------------------------------------------------------------------------------------

class LabelledImages(torch.utils.data.Dataset):
    """(uint8 CHW image, label) pairs; unreadable files are dropped up front with a warning."""

    def __init__(self, files: list[Path], labels: list[int], preprocess: Preprocess, transform=None):
        self.files, self.labels, self.preprocess, self.transform = files, labels, preprocess, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        pixels = to_tensor(load_image(self.files[i], self.preprocess))
        if self.transform is not None:
            pixels = self.transform(pixels)
        return pixels, self.labels[i]


def _readable(dataset: ImageDataset, samples) -> list:
    kept = []
    for s in samples:
        try:
            with open_rgb(dataset.absolute_path(s)):
                kept.append(s)
        except ImageError as err:
            log.warning("%s: %s; skipped", s.path, err)
    return kept


def _pseudo_record(source: str, pseudo: list, classes: list[str]) -> dict:
    """Which guessed labels the weights learn from, read once at the start: a model that trained on its test
    images (without their labels) gives transductive test figures, and its checkpoint says so."""
    return {"file": source, "sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(), "rows": len(pseudo),
            "splits": dict(Counter(s.split for s in pseudo)), "classes": dict(Counter(classes[s.label] for s in pseudo))}


def train_val_samples(dataset: ImageDataset, val_fraction: float, seed: int):
    """Train and validation samples; validation is carved from train (stratified, seeded) when absent."""
    train = [s for s in dataset.samples if s.split == "train" and s.label >= 0]
    val = [s for s in dataset.samples if s.split == "val" and s.label >= 0]
    if not train:
        raise DataError(f"{dataset.root}: no labelled training images")
    if len({s.label for s in train}) < 2:
        raise DataError(f"{dataset.root}: the training images hold one class; fine-tuning needs at least two")
    if not val:
        kept, carved = carve_validation([s.label for s in train], val_fraction, seed)
        train, val = [train[i] for i in kept], [train[i] for i in carved]
    return train, val


# --- parameter groups, learning rates, freezing --------------------------------------------------------

def stage_groups(model: Classifier, spec) -> list[list[nn.Parameter]]:
    """Backbone parameters in ``STAGE_GROUPS`` groups, earliest first, then the head as the last group.

    Groups end where the subtrees of the registry's stage modules end, in module order; what
    follows the last stage (timm's conv_head, convnext's final norm) belongs with the top stage.
    """
    modules = list(model.features.net.named_modules())
    names = [name for name, _ in modules]
    ends = sorted(max(i for i, n in enumerate(names) if n == b or n.startswith(b + "."))
                  for b in spec.stages[:STAGE_GROUPS - 1])
    groups: list[list[nn.Parameter]] = [[] for _ in range(STAGE_GROUPS)]
    for i, (_, module) in enumerate(modules):
        groups[sum(i > end for end in ends)].extend(module.parameters(recurse=False))
    return groups + [list(model.head.parameters())]


def trainable_groups(unfreeze: str) -> int:
    """How many backbone groups (from the top) train: 0..4 (``unfreeze`` is checked by ``FinetuneConfig``)."""
    return STAGE_GROUPS if unfreeze == "all" else int(unfreeze)


def group_learning_rates(lr: float, lr_min: float, n_groups: int) -> list[float]:
    """fastai's ``slice(lr_min, lr)``: geometric from the earliest backbone group to the top; the head gets ``lr``."""
    if n_groups == 1:
        return [lr]
    return [lr_min * (lr / lr_min) ** (i / (n_groups - 1)) for i in range(n_groups)]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) or \
        "Norm" in type(module).__name__


def set_trainable(model: Classifier, spec, unfreeze: str, bn: str) -> list[list[nn.Parameter]]:
    """Freeze all but the top ``unfreeze`` groups and the head; return the trainable groups, earliest first."""
    groups = stage_groups(model, spec)
    n_train = trainable_groups(unfreeze)
    frozen_bn = set()
    if bn == "frozen":
        frozen_bn = {id(p) for m in model.features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for p in m.parameters(recurse=False)}
    active = []
    for index, params in enumerate(groups):
        is_head = index == len(groups) - 1
        train_group = is_head or index >= STAGE_GROUPS - n_train
        for p in params:
            p.requires_grad_(train_group and id(p) not in frozen_bn)
        if train_group:
            active.append([p for p in params if p.requires_grad])
    return active


def set_train_mode(model: Classifier, bn: str) -> None:
    """Train mode, except BatchNorm layers stay in inference mode when ``bn == "frozen"``."""
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def make_optimizer(model: Classifier, groups: list[list[nn.Parameter]], lrs: list[float], weight_decay: float):
    """AdamW with one decayed and one undecayed parameter group per learning rate (norms and biases undecayed)."""
    no_decay = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    no_decay |= {id(p) for p in model.parameters() if p.ndim <= 1}
    param_groups = []
    for params, lr in zip(groups, lrs):
        decay = [p for p in params if id(p) not in no_decay]
        plain = [p for p in params if id(p) in no_decay]
        param_groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                         {"params": plain, "lr": lr, "weight_decay": 0.0}]
    param_groups = [g for g in param_groups if g["params"]]
    return torch.optim.AdamW(param_groups)


# --- the training loop -----------------------------------------------------------------------------------

class Trainer:
    """Everything one fine-tuning run needs, built once from a dataset and a config."""

    def __init__(self, data: ImageDataset | str | Path, config: FinetuneConfig, out: str | Path):
        self.config = config
        self.out = Path(out)
        self.dataset = data if isinstance(data, ImageDataset) else scan_dataset(
            data, split=config.split, seed=config.split_seed, split_from=config.split_from, split_by=config.split_by)
        self.spec = get_backbone(config.backbone)
        self.preprocess = self.spec.preprocess_for(config.image_size, config.fit)
        self.device = resolve_device(config.device)
        self.precision, _ = resolve_precision(config.precision, self.device.type, self.spec.architecture)
        self.weights = resolve_weights(self.spec, config.weights)
        train, val = train_val_samples(self.dataset, config.val_fraction, config.validation_seed)
        # pseudo-labelled images train only: validation keeps to given labels, so early stopping trusts no guess
        pseudo = pseudo_labelled(self.dataset, config.pseudo_labels) if config.pseudo_labels else []
        self.train_samples = _readable(self.dataset, train + pseudo)
        self.val_samples = _readable(self.dataset, val)
        self.classes = self.dataset.classes
        self.pseudo_record = _pseudo_record(config.pseudo_labels, pseudo, self.classes) if pseudo else None
        torch.manual_seed(config.seed)
        features = build_feature_model(self.spec, self.weights, drop_path=config.drop_path)
        self.model = Classifier(features, self.spec.dim, len(self.classes), config.dropout).to(self.device)
        if config.init_head_from:
            warm_start_head(self.model, config.init_head_from, self.spec.name, self.classes)
        counts = np.bincount([s.label for s in self.train_samples], minlength=len(self.classes))
        weights = len(self.train_samples) / (len(self.classes) * np.maximum(counts, 1))
        self.loss = nn.CrossEntropyLoss(
            weight=torch.tensor(weights, dtype=torch.float32, device=self.device) if config.class_weights else None)

    @property
    def workers(self) -> int:
        """Decoding processes: on a GPU, decoding in the training process would leave the GPU waiting."""
        if self.config.workers is not None:
            return self.config.workers
        return gpu_decoding_workers() if self.device.type == "cuda" else 0

    def loader(self, samples, train: bool, epoch: int = 0):
        transform = augmentation(self.config.aug, self.preprocess.size) if train else None
        images = LabelledImages([self.dataset.absolute_path(s) for s in samples], [s.label for s in samples],
                                self.preprocess, transform)
        # A generator seeded by (seed, epoch) fixes order and augmentation, so a resumed run repeats exactly.
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.utils.data.DataLoader(images, batch_size=self.config.batch_size, shuffle=train,
                                           drop_last=train and len(samples) > self.config.batch_size,
                                           num_workers=self.workers, generator=generator,
                                           pin_memory=self.device.type == "cuda")

    def autocast(self):
        return autocast(self.device, self.precision)

    def sidecar(self, metrics: dict) -> dict:
        """What a checkpoint of this run records beside its weights."""
        return {
            "featx_version": __version__, "backbone": self.spec.name,
            "base_weights": self.weights.identifier, "base_weights_sha256": self.weights.sha256,
            "classes": self.classes, "preprocess": self.preprocess.as_dict(), "metrics": metrics,
            "config": asdict(self.config), "dataset_root": str(self.dataset.root),
            "dataset_fingerprint": self.dataset.fingerprint(),
            "train_rows": len(self.train_samples), "val_rows": len(self.val_samples),
            "trained_on": {"split_source": self.dataset.split_source, "images": self.dataset.membership(),
                           "train_val": self.dataset.membership(("train", "val")),
                           "validation": {"images": sorted(s.path for s in self.val_samples),
                                          "seed": self.config.validation_seed,
                                          "val_fraction": self.config.val_fraction}},
            **({"pseudo_labels": self.pseudo_record} if self.pseudo_record else {}),
        }

    def phases(self) -> list[tuple[str, int]]:
        """(unfreeze, epochs) per phase: head alone first, then the asked stages."""
        phases = []
        if self.config.head_epochs and self.config.unfreeze != "0":
            phases.append(("0", self.config.head_epochs))
        phases.append((self.config.unfreeze, self.config.epochs))
        return [(u, e) for u, e in phases if e > 0]

    def optimizer_for(self, unfreeze: str, steps: int):
        groups = set_trainable(self.model, self.spec, unfreeze, self.config.bn)
        # A stage's rate depends on its depth alone, not on how many stages are unfrozen.
        ladder = group_learning_rates(self.config.lr, self.config.lr_min or self.config.lr / 100, STAGE_GROUPS)
        lrs = ladder[STAGE_GROUPS - (len(groups) - 1):] + [self.config.lr]
        optimizer = make_optimizer(self.model, groups, lrs, self.config.weight_decay)
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        # One-cycle needs a warm-up and an anneal of at least a step each; tiny runs get a short cycle.
        total = max(steps, 4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total,
                                                        pct_start=max(0.25, 2 / total))
        return optimizer, scheduler

    def train_epoch(self, epoch: int, optimizer, scheduler, progress: bool,
                    average: WeightAverage | None = None) -> float:
        from tqdm.auto import tqdm

        set_train_mode(self.model, self.config.bn)
        total, seen = 0.0, 0
        scaler = torch.amp.GradScaler(enabled=self.precision == "fp16" and self.device.type == "cuda")
        batches = self.loader(self.train_samples, train=True, epoch=epoch)
        for images, labels in tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", disable=not progress,
                                   leave=False):
            images, labels = images.to(self.device), labels.to(self.device)
            with self.autocast():
                loss = self.loss(self.model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                     self.config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if scheduler.last_epoch < scheduler.total_steps:
                scheduler.step()
            if average is not None:
                average.update(self.model)
            total += loss.item() * len(labels)
            seen += len(labels)
        return total / max(seen, 1)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses, probs, truth = [], [], []
        for images, labels in self.loader(self.val_samples, train=False):
            images, labels = images.to(self.device), labels.to(self.device)
            with self.autocast():
                logits = self.model(images).float()
            losses.append(nn.functional.cross_entropy(logits, labels, reduction="sum").item())
            probs.append(logits.softmax(1).cpu().numpy())
            truth.append(labels.cpu().numpy())
        p, y = np.concatenate(probs), np.concatenate(truth)
        scores = classification_metrics(y, p, self.classes)  # the same definitions as the leaderboard's
        metrics = {"val_loss": sum(losses) / len(y), "val_accuracy": scores["accuracy"],
                   "val_balanced_accuracy": scores["balanced_accuracy"]}
        if np.isfinite(scores["roc_auc"]):
            metrics["val_roc_auc"] = scores["roc_auc"]
        return metrics


def finetune(data: ImageDataset | str | Path, config: FinetuneConfig = FinetuneConfig(), *,
             out: str | Path = "runs/finetune", resume: bool = False, progress: bool = True,
             stop_after_epochs: int | None = None) -> FinetuneResult:
    """Fine-tune ``config.backbone`` on the train split, early-stopping on validation; save checkpoints.

    ``stop_after_epochs`` ends the run early as an interruption would (tests and time-boxed runs).
    """
    trainer = Trainer(data, config, out)
    trainer.out.mkdir(parents=True, exist_ok=True)
    state = None
    if resume:
        state = load_resume_state(trainer.out, trainer.spec.name, trainer.classes)
        trainer.model.load_state_dict(state["model"])
    history: list[dict] = state["history"] if state else []
    best = state["best"] if state else {"val_loss": math.inf, "epoch": 0}
    done = state["epoch"] if state else 0  # epochs completed, counted across phases
    average = WeightAverage(trainer.model, config.ema, state and state.get("average")) if config.ema else None
    began = time.perf_counter()
    first = 0
    steps_per_epoch = len(trainer.loader(trainer.train_samples, train=True))
    for phase, (unfreeze, n_epochs) in enumerate(trainer.phases(), start=1):
        phase_end, phase_start = first + n_epochs, first
        first = phase_end
        if done >= phase_end:
            continue
        optimizer, scheduler = trainer.optimizer_for(unfreeze, n_epochs * steps_per_epoch)
        stale = 0
        if state and done > phase_start:  # resuming inside this phase: its optimiser and schedule go on
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            stale = state["stale"]
        for epoch in range(max(done, phase_start), phase_end):
            if stale >= config.patience:
                log.info("early stop: validation loss has not improved for %d epochs", stale)
                break
            if stop_after_epochs is not None and epoch >= stop_after_epochs:
                return FinetuneResult(trainer.out, best["epoch"], best, history, time.perf_counter() - began)
            train_loss = trainer.train_epoch(epoch, optimizer, scheduler, progress, average)
            with average.applied(trainer.model) if average else nullcontext():
                metrics = {"epoch": epoch + 1, "phase": phase, "unfreeze": unfreeze, "train_loss": train_loss,
                           **trainer.evaluate(), "lr": max(g["lr"] for g in optimizer.param_groups)}
            history.append(metrics)
            log.info("epoch %d (unfreeze %s): train loss %.4f, val loss %.4f, val accuracy %.4f",
                     epoch + 1, unfreeze, train_loss, metrics["val_loss"], metrics["val_accuracy"])
            if metrics["val_loss"] < best["val_loss"]:
                best, stale = metrics, 0
                scored = average.weights if average else trainer.model.state_dict()  # what validation scored
                save_checkpoint(trainer.out / "best.pt", scored, trainer.sidecar(metrics))
            else:
                stale += 1
            save_resume_state(trainer.out, model_state=trainer.model.state_dict(), optimizer=optimizer,
                              scheduler=scheduler, epoch=epoch + 1, history=history, best=best, stale=stale,
                              sidecar=trainer.sidecar(history[-1]), average=average and average.state_dict())
            _write_history(trainer.out, history)
    return FinetuneResult(trainer.out, best["epoch"], best, history, time.perf_counter() - began)


# --- starting the head from a frozen-feature run ---------------------------------------------------------

def warm_start_head(model: Classifier, run_dir: str | Path, backbone: str, classes: list[str]) -> None:
    """Start the linear head from the logistic-regression head of a ``featx train/compare`` run.

    The scaler folds into the weights: ``W (x - mu) / sigma + b = (W / sigma) x + (b - W mu / sigma)``.
    """
    heads = [h for h in (load_head(p) for p in head_files(run_dir, "logreg")) if h["backbone"] == backbone]
    if not heads:
        raise DataError(f"{run_dir}: no logreg head trained on {backbone} embeddings")
    head = heads[0]
    if head["classes"] != list(classes):
        raise DataError(f"{run_dir}: logreg head classes {head['classes']} differ from {list(classes)}")
    if head["embeddings_meta"].get("layer") != "penultimate":
        raise DataError(f"{run_dir}: the logreg head was trained on layer {head['embeddings_meta'].get('layer')}, "
                        "not on penultimate features")
    scaler, logreg = head["pipeline"]["scale"], head["pipeline"]["clf"]
    coef, intercept = logreg.coef_, logreg.intercept_
    if coef.shape[0] == 1:  # binary: softmax over [0, w·x + b] equals the sigmoid
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        model.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


# --- LR finder --------------------------------------------------------------------------------------------

def lr_sweep(optimizer: torch.optim.Optimizer, passes: Callable[[int], Iterable], loss_of: Callable, *,
             start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100) -> tuple[list[float], list[float]]:
    """One optimiser step per batch at an exponentially growing LR; returns the LRs and the smoothed losses.

    ``passes(step)`` starts a pass over the data (re-made when one runs out, seeded by the step it starts
    at) and ``loss_of(batch)`` computes a batch's loss. The loss is smoothed (EMA 0.98, bias-corrected);
    the sweep stops when it exceeds 4× the best or stops being finite.
    """
    factor = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    while len(lrs) < steps:
        batches = 0
        for batch in passes(len(lrs)):
            batches += 1
            step = len(lrs)
            lr = start_lr * factor ** step
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            avg = 0.98 * avg + 0.02 * loss.item()
            smooth = avg / (1 - 0.98 ** (step + 1))
            lrs.append(lr)
            losses.append(smooth)
            best = min(best, smooth)
            if len(lrs) >= steps or not math.isfinite(smooth) or smooth > 4 * best:
                return lrs, losses
        if not batches:
            raise DataError("the LR sweep has no training batches; use more images or a smaller batch size")
    return lrs, losses


def lr_find(trainer: Trainer, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100) -> dict:
    """LR sweep (``lr_sweep``) on the train split with the asked unfreezing; returns the curve's suggestions.

    Suggested LR: the steepest descent of the smoothed curve, and the "valley" (a tenth of the
    LR at the minimum). Model weights and trainable flags are restored afterwards.
    """
    config = trainer.config
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    flags = [p.requires_grad for p in trainer.model.parameters()]
    groups = set_trainable(trainer.model, trainer.spec, config.unfreeze, config.bn)
    optimizer = make_optimizer(trainer.model, groups, [start_lr] * len(groups), config.weight_decay)
    set_train_mode(trainer.model, config.bn)

    def loss_of(batch):
        images, labels = batch
        with trainer.autocast():
            return trainer.loss(trainer.model(images.to(trainer.device)), labels.to(trainer.device))

    lrs, losses = lr_sweep(optimizer, lambda step: trainer.loader(trainer.train_samples, train=True, epoch=step),
                           loss_of, start_lr=start_lr, end_lr=end_lr, steps=steps)
    trainer.model.load_state_dict(saved)
    for p, flag in zip(trainer.model.parameters(), flags):
        p.requires_grad_(flag)
    result = suggest_lr(np.array(lrs), np.array(losses))
    trainer.out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(save(lr_finder_figure(lrs, losses, result), finetune_file(trainer.out, "lr_find_plot")))
    finetune_file(trainer.out, "lr_find_json").write_text(
        json.dumps({**result, "lrs": lrs, "losses": losses}, indent=2) + "\n")
    return result


def suggest_lr(lrs: np.ndarray, losses: np.ndarray) -> dict:
    """The valley (the LR at the lowest smoothed loss, divided by 10) and the steepest descent of loss vs log LR.

    The first tenth of the sweep is left out, as fastai does: there the smoothed loss still rests on
    a few batches, and their noise looked like the steepest descent (which then sat at the sweep's
    first LR). The descent is measured across a tenth of the sweep, so that batch noise averages out.
    The valley is the steadier of the two.
    """
    finite = np.isfinite(losses)
    lrs, losses = lrs[finite], losses[finite]
    lrs, losses = lrs[len(lrs) // 10:], losses[len(losses) // 10:]
    if len(lrs) < 3:
        raise DataError("the LR sweep stopped too early to suggest anything; use more images or steps")
    low = int(np.argmin(losses))
    log = np.log10(lrs)
    steepest = float(lrs[0])  # the loss only rose: there is no descent to measure
    window = min(len(lrs) // 10, low) or low
    if window:
        slopes = (losses[window:low + 1] - losses[:low + 1 - window]) / (log[window:low + 1] - log[:low + 1 - window])
        start = int(np.argmin(slopes))
        steepest = float(10 ** ((log[start] + log[start + window]) / 2))
    return {"valley": float(lrs[low] / 10), "steepest": steepest, "min_loss_lr": float(lrs[low])}


def _write_history(out: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(finetune_file(out, "history_csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    save(history_figure(history), finetune_file(out, "history_plot"))
