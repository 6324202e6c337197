"""The ``featx.checkpoint/1`` format: a fine-tuned model's state dict beside a JSON sidecar, and the resume state.

``best.pt`` holds the model's state dict (backbone ``features.net.*`` and head ``head.*``), loaded
with ``weights_only=True`` so that a checkpoint never runs code; ``best.json`` says what it is
(backbone, classes, preprocessing, metrics, config). ``last.pt`` adds optimiser, scheduler, epoch,
history and RNG states, so an interrupted fine-tune continues exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from featx.embed.backbones import DEFAULT_BACKBONE, BackboneSpec, ResolvedWeights, get_backbone, resolve_weights
from featx.errors import ConfigError, DataError
from featx.data.images import Preprocess
from featx.store.memo import remembered_sha256

CHECKPOINT_FORMAT = "featx.checkpoint/1"
BACKBONE_PREFIX = "features.net."  # where the backbone sits in a fine-tuned classifier's state dict


def _write_sidecar(path: Path, sidecar: dict) -> None:
    """Written whole or not at all: a half sidecar would make the checkpoint beside it unreadable."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"format": CHECKPOINT_FORMAT, **sidecar}, indent=2) + "\n")
    partial.replace(path.with_suffix(".json"))


def _save_atomically(state: dict, path: Path) -> None:
    # torch names the records inside its zip after the file written (best.tmp -> "best/"), so the temporary
    # name fixes the checkpoint's bytes, its hash, and the cache key of `extract --checkpoint`: keep it.
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def save_checkpoint(path: Path, model_state: dict, sidecar: dict) -> None:
    """``path`` (the state dict) and its ``.json`` sidecar."""
    _save_atomically(model_state, path)
    _write_sidecar(path, sidecar)


def save_resume_state(folder: Path, *, model_state: dict, optimizer, scheduler, epoch: int, history: list[dict],
                      best: dict, stale: int, sidecar: dict, average: dict | None = None) -> None:
    """``folder/last.pt``: everything an interrupted fine-tune needs to continue exactly, with RNG states
    (and the weight average, ``finetune --ema``)."""
    import torch

    _save_atomically({
        "model": model_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "history": json.dumps(history), "best": json.dumps(best), "stale": stale,
        "torch_rng": torch.get_rng_state(), "python_rng": json.dumps(random.getstate()),
        **({"average": average} if average else {}),
    }, folder / "last.pt")
    _write_sidecar(folder / "last.pt", sidecar)


def load_resume_state(folder: Path, backbone: str, classes: list[str]) -> dict:
    """The state saved by ``save_resume_state``, checked against the run; restores the RNG states."""
    import torch

    from featx.embed.feature_model import load_tensors

    path = folder / "last.pt"
    if not path.exists():
        raise DataError(f"{path}: nothing to resume; run without --resume first")
    check_checkpoint(_read_sidecar(path.with_suffix(".json")), backbone, classes, path)
    state = load_tensors(path, "checkpoint")
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_tuples(json.loads(state["python_rng"])))
    return {**state, "history": json.loads(state["history"]), "best": json.loads(state["best"])}


def _read_sidecar(path: Path) -> dict:
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable checkpoint sidecar ({type(err).__name__})") from None
    if not isinstance(sidecar, dict):
        raise DataError(f"{path}: not a featx checkpoint sidecar")
    return sidecar


def _tuples(value):
    """JSON turned ``random.getstate()``'s tuples into lists; ``random.setstate`` wants them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_sidecar(path: str | Path) -> dict:
    """The checked sidecar of the checkpoint ``path`` (no tensors read: no torch needed)."""
    path = Path(path)
    sidecar_path = path.with_suffix(".json")
    if not path.is_file() or not sidecar_path.is_file():
        raise DataError(f"{path}: checkpoint or its sidecar {sidecar_path.name} not found")
    sidecar = _read_sidecar(sidecar_path)
    check_checkpoint(sidecar, sidecar.get("backbone", "?"), None, path)
    return sidecar


def check_checkpoint(sidecar: dict, backbone: str, classes: list[str] | None, path: Path) -> None:
    """Refuse a checkpoint made for another backbone or another class list."""
    if sidecar.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a featx checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in ("backbone", "classes", "preprocess") if key not in sidecar]
    if missing:
        raise DataError(f"{path}: its sidecar lacks {', '.join(missing)}; not a complete featx checkpoint")
    if sidecar["backbone"] != backbone:
        raise DataError(f"{path}: made for backbone {sidecar['backbone']!r}, not {backbone!r}")
    if classes is not None and sidecar["classes"] != list(classes):
        raise DataError(f"{path}: made for classes {sidecar['classes']}, not {list(classes)}")
    pseudo = sidecar.get("pseudo_labels")
    if pseudo is not None and not (isinstance(pseudo, dict) and isinstance(pseudo.get("sha256"), str)):
        raise DataError(f"{path}: its sidecar's pseudo_labels is not the record featx finetune writes")


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(sidecar, backbone state dict) of a ``best.pt``/``last.pt``; the head is dropped."""
    from featx.embed.feature_model import load_tensors

    path = Path(path)
    sidecar = read_sidecar(path)
    state = load_tensors(path, "checkpoint")
    state = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a featx checkpoint (no state dict inside)")
    return sidecar, {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


@dataclass(frozen=True)
class BackboneSource:
    """The backbone to run: a registered one with its pretrained weights, or a fine-tuned checkpoint of one."""

    spec: BackboneSpec
    weights: ResolvedWeights  # for a checkpoint: the checkpoint file and its hash
    preprocess: Preprocess  # the backbone's own, or the one the checkpoint was trained with
    checkpoint: Path | None = None  # the fine-tuned checkpoint, read only when the model is built
    pseudo_labels: dict | None = None  # the guessed labels the checkpoint trained on (finetune --pseudo-labels)
    trained_on: dict | None = None  # which images it trained on (finetune's split); None for older checkpoints

    @property
    def label(self) -> str:
        """The name in leaderboards: the backbone's, or ``<backbone>+ft-<hash>`` for a fine-tuned one."""
        return self.spec.name if self.checkpoint is None else f"{self.spec.name}+ft-{self.weights.sha256[:8]}"

    def backbone_state(self) -> dict | None:
        """The fine-tuned backbone's state dict (None for pretrained weights): reading it needs torch."""
        return None if self.checkpoint is None else read_checkpoint(self.checkpoint)[1]


def backbone_source(backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
                    checkpoint: str | Path | None = None) -> BackboneSource:
    """Resolve what extraction and prediction run; a checkpoint brings its own backbone and preprocessing."""
    if checkpoint is None:
        spec = get_backbone(backbone)
        return BackboneSource(spec, resolve_weights(spec, weights), spec.preprocess)
    sidecar = read_sidecar(checkpoint)
    spec = get_backbone(sidecar["backbone"])
    if backbone not in (DEFAULT_BACKBONE, spec.name):
        raise ConfigError(f"{checkpoint} is a {spec.name} checkpoint; drop --backbone {backbone}")
    weights = ResolvedWeights(f"checkpoint:{Path(checkpoint).name}", Path(checkpoint), remembered_sha256(checkpoint))
    return BackboneSource(spec, weights, Preprocess.from_dict(sidecar["preprocess"]), Path(checkpoint),
                          sidecar.get("pseudo_labels"), sidecar.get("trained_on"))
