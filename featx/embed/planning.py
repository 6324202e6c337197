"""Planning an extraction without a model: the dataset, the backbone's identity, the preprocessing, the
precision and the cache key, and finding the file when it is cached already.

Nothing here imports torch, so a warm ``featx extract`` and a cluster's client decide everything in a
fraction of a second; ``featx.embed.extraction`` runs the model when there is work to do.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from featx.data.remote import is_url
from featx.embed.backbones import DEFAULT_BACKBONE
from featx.embed.checkpoints import BackboneSource, backbone_source
from featx.data.datasets import ImageDataset, Sample, scan_dataset
from featx.errors import ConfigError
from featx.embed.hardware import device_type, resolve_precision
from featx.data.images import MAX_PIXELS, Preprocess
from featx.store.memo import remembered_of_file
from featx.store.embeddings import AUGMENTED, cache_key, cache_path, check_intact, package_version, read_meta
from featx.version import __version__
from featx.vocab import check_fields, parse_layer, setting, shared_setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract; every field that changes the numbers goes into the cache key."""

    backbone: str = setting(DEFAULT_BACKBONE, "Registered backbone (see `featx list`) or timm:<model>.",
                            cli=False)  # `featx extract --backbone` is repeatable: one config each
    weights: str | None = shared_setting("weights", None)  # None: default search; "none": random init; else a file
    checkpoint: str | None = setting(None, "A fine-tuned best.pt from `featx finetune`: its backbone, cached under a "
                                           "key of its own.", path="file")  # sets backbone and preprocessing
    cache_dir: str = setting("cache", "Cache folder; files go to OUT/<dataset>/<backbone>-<key>.h5.", flag="--out",
                             path="any")
    layer: str = setting("penultimate", "penultimate, stages, or a comma list of stage1..stage4,penultimate (pooled, "
                                        "concatenated).", metavar="LAYER")
    tta: bool = setting(False, "Average the features of the image and its horizontal flip.")
    tta_views: int = setting(0, "Test-time augmentation: average every image's features over the image and K views "
                                "of it under the --aug transforms, the same K for every image (and for `featx "
                                "predict`). K+1 times the work.", metavar="K")
    precision: str = shared_setting("precision", "auto")  # featx.embed.hardware.resolve_precision
    dtype: str = setting("float16", "Storage type of the features in the HDF5 file.")
    image_size: int | None = shared_setting("image_size", None)  # None: the backbone's own input size
    fit: str = shared_setting("fit", "crop")
    augment: int = setting(0, "Also embed K augmented copies of each train image; heads then train on them too (never "
                              "on copies of validation images).", metavar="K")
    aug: str = setting("natural", "Transforms of the --augment copies and --tta-views; xray varies contrast, exposure, "
                                  "sharpness and position and never flips.")
    batch_size: int = shared_setting("batch_size", 32)
    adapt_bn: bool = setting(False, "AdaBN: embed each split with BatchNorm statistics re-estimated on its own images "
                                    "(up to 1,000 of them; no labels read), for test images unlike the training ones. "
                                    "Weights stay frozen.")
    workers: int | None = setting(None, "DataLoader decoding worker processes (default: a thread pool on CPU, 8 on "
                                        "GPU).")
    prefetch: int | None = setting(None, "Batches decoded ahead while the model embeds one (default: 2 on a GPU, 0 "
                                         "on a CPU, whose cores the forward already keeps busy).", metavar="N")
    decode: str = setting("auto", "How images are decoded: tensor (JPEGs in batches on the device: nvJPEG on a GPU), "
                                  "pillow (one by one on CPU threads or DataLoader workers), or auto (pillow: the "
                                  "faster of the two where measured).")  # featx.embed.decoding
    device: str = shared_setting("device", "auto")
    max_pixels: int = setting(MAX_PIXELS, "Pixel budget per image: larger images are recorded as skipped, never "
                                          "decoded.")
    out: str | None = setting(None, "An explicit file instead of the cache layout.", cli=False)

    def __post_init__(self):
        check_fields(self, "extract")
        # Files by absolute path: the config is recorded with the features, and predict reads it from anywhere.
        for name in ("weights", "checkpoint"):
            value = getattr(self, name)
            if value and value.lower() != "none" and not is_url(value):
                object.__setattr__(self, name, str(Path(value).expanduser().absolute()))
        if (self.augment or self.tta_views) and self.aug == "none":
            what = "augmented copies" if self.augment else "test-time views"
            raise ConfigError(f"{what} need transforms: the 'aug' parameter must be natural or xray")


# Images per split whose BatchNorm statistics replace the pretrained ones with --adapt-bn: a sample, seed 0.
ADAPT_BN_IMAGES = 1000
ADAPT_BN_BATCH = 64  # images per batch at least while BatchNorm statistics are re-estimated
ADAPT_BN_MIN_IMAGES = 32  # fewer new images than this give statistics of those few images, not of their domain


def adaptation_sample(files: list) -> list:
    """The images whose BatchNorm statistics stand for their domain: up to ``ADAPT_BN_IMAGES``, seeded, in random
    order (batches mix the classes). Extraction and prediction share it, so both pick the same from the same."""
    picked = np.random.default_rng(0).choice(len(files), min(ADAPT_BN_IMAGES, len(files)), replace=False)
    return [files[i] for i in picked]


@dataclass
class ExtractResult:
    """What one extraction produced, for the CLI summary and for scripts."""

    path: Path
    cached: bool
    rows: int
    label: str = ""
    resumed_from: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0  # rows copied from earlier files of the same recipe (``featx.store.reuse``), not embedded

    @property
    def images_per_second(self) -> float:
        return (self.rows - self.resumed_from - self.reused) / self.seconds if self.seconds else 0.0


@dataclass
class Plan:
    """Everything that decides an extraction's numbers, made once without a model: any range of its rows
    can then be embedded anywhere (this process, or a worker on another machine) and give the same rows."""

    dataset: ImageDataset
    config: ExtractConfig
    source: BackboneSource
    layers: tuple[str, ...]
    preprocess: Preprocess
    samples: list[Sample]  # the images, then their augmented copies (from row ``first_row``: see ``part``)
    precision: str  # the one that runs, resolved from the asked one on the device that runs it
    recipe: dict
    key: str
    path: Path
    n_images: int  # rows before the augmented copies
    precision_reason: str = ""
    decoder: str = "pillow"
    first_row: int = 0
    backbone_validation: dict | None = None  # the images a checkpoint fine-tuned on these images held out
    contents: list[str] | None = None  # every row's ``row_contents``, found when first asked (hashes the images)

    @property
    def n_rows(self) -> int:
        return self.first_row + len(self.samples)

    def part(self, start: int, stop: int) -> "Plan":
        """The plan of rows ``start:stop`` alone: what one shard's task needs, not the whole dataset's list."""
        rows = self.samples[start - self.first_row:stop - self.first_row]
        self.dataset.fingerprint()  # computed once here, carried in the copy
        return replace(self, samples=rows, first_row=start, contents=self.row_contents(start, stop),
                       dataset=replace(self.dataset, samples=[], _contents=None))

    def row_contents(self, start: int, stop: int) -> list[str]:
        """What identifies rows ``start:stop`` wherever they stand: an image's content hash; for augmented copy k of
        an image, its hash and ``#k`` (which also seeds the copy's transforms, ``augment.copy_seed``)."""
        if self.contents is None:
            images = self.dataset.contents()
            train = [c for c, s in zip(images, self.dataset.samples) if s.split == "train"]
            self.contents = images + [f"{c}#{k}" for k in range(1, self.config.augment + 1) for c in train]
        return self.contents[start - self.first_row:stop - self.first_row]

    def attrs(self, device: str) -> dict:
        """The provenance every file of this extraction records."""
        spec, dataset = self.source.spec, self.dataset
        return {
            "featx_version": __version__, "backbone": spec.name, "label": self.source.label,
            "weights": self.source.weights.identifier, "weights_sha256": self.source.weights.sha256,
            "layer": ",".join(self.layers), "pooling": "avg", **self.preprocess.as_dict(), "tta": self.config.tta,
            "tta_views": self.config.tta_views,
            "precision": self.precision, "precision_reason": self.precision_reason, "decoder": self.decoder,
            "classes": dataset.classes, "dataset_name": dataset.name,
            "dataset_root": str(dataset.root.resolve()), "dataset_fingerprint": dataset.fingerprint(),
            "fingerprint_method": dataset.fingerprint_method, "split_source": dataset.split_source,
            "scan_skipped": dataset.skipped, "cache_key": self.key, "recipe": self.recipe,
            "torch_version": package_version("torch"), "torchvision_version": package_version("torchvision"),
            "timm_version": package_version("timm"), "device": str(device), "config": asdict(self.config),
            **({"backbone_pseudo_labels": self.source.pseudo_labels} if self.source.pseudo_labels else {}),
            **({"backbone_validation": self.backbone_validation} if self.backbone_validation else {}),
        }


def plan_extraction(data: ImageDataset | str | Path, config: ExtractConfig = ExtractConfig(), *,
                    split: str | None = None, seed: int = 0, split_from: str | Path | None = None,
                    split_by: str = "shuffle", device_here: bool = True) -> Plan:
    """Scan, resolve the backbone and preprocessing, and compute the cache key, without building a model.

    ``device_here=False`` (a cluster) trusts the workers to have the asked device: the client may have none.
    """
    dataset = data if isinstance(data, ImageDataset) else scan_dataset(data, split=split, seed=seed,
                                                                       split_from=split_from, split_by=split_by)
    layers = parse_layer(config.layer)
    source = backbone_source(config.backbone, config.weights, config.checkpoint)
    backbone_validation = checkpoint_validation(source, dataset)
    spec = source.spec
    if source.checkpoint is None:
        preprocess = spec.preprocess_for(config.image_size, config.fit)
    elif config.image_size is None:  # a checkpoint brings the preprocessing it was trained with
        preprocess = source.preprocess
    else:
        preprocess = spec.preprocess_for(config.image_size, source.preprocess.fit)
    preprocess = replace(preprocess, max_pixels=config.max_pixels)
    samples = dataset.samples + [Sample(s.path, s.label, AUGMENTED, s.group)
                                 for _ in range(config.augment) for s in dataset.samples if s.split == "train"]
    device = device_type(config.device) if device_here else "cpu" if config.device == "auto" else config.device[:4]
    precision, reason = resolve_precision(config.precision, device, spec.architecture)
    recipe = {
        "dataset_fingerprint": dataset.fingerprint(), "backbone": spec.name, "weights_sha256": source.weights.sha256,
        "preprocess": preprocess.as_dict(), "layer": ",".join(layers), "pooling": "avg", "tta": config.tta,
        "dtype": config.dtype, "precision": precision,
    }
    if config.augment:  # only when asked, so keys of files made without copies stay as they were
        recipe["augment"] = {"copies": config.augment, "aug": config.aug, "seeds": "content"}
    if config.tta_views:
        recipe["tta_views"] = {"views": config.tta_views, "aug": config.aug}
    if config.adapt_bn:
        recipe["adapt_bn"] = {"images_per_split": ADAPT_BN_IMAGES}
    if source.pseudo_labels:  # the same weights trained another way must not pass for a file that says so
        recipe["backbone_pseudo_labels"] = source.pseudo_labels["sha256"]
    # auto is Pillow on every device: on an H100 with 16 cores, DataLoader workers with Pillow fed the model
    # faster than nvJPEG did, and nvJPEG's colour pixels differ from libjpeg's (docs/performance.md)
    decoder = "pillow" if config.decode == "auto" else config.decode
    if decoder == "tensor":  # its pixels differ from Pillow's (draft mode, resampler; on a GPU, nvJPEG's chroma)
        recipe["decoder"] = decoder
    key = cache_key(recipe)
    path = Path(config.out) if config.out else cache_path(config.cache_dir, dataset.name, source.label, key)
    if not config.out and not dataset.verify_content and not path.exists():
        recipe, key, path = _cached_by_times(recipe, dataset, config.cache_dir, source.label) or (recipe, key, path)
    return Plan(dataset, config, source, layers, preprocess, samples, precision, recipe, key, path,
                n_images=len(dataset.samples), precision_reason=reason, decoder=decoder,
                backbone_validation=backbone_validation)


def _cached_by_times(recipe: dict, dataset: ImageDataset, cache_dir: str, label: str) -> tuple | None:
    """The recipe, key and path of this file as featx before 0.3 cached it (its key hashed file times, not
    contents), when it is there: files already extracted stay found after an upgrade."""
    older = {**recipe, "dataset_fingerprint": dataset.fingerprint_by_times()}
    key = cache_key(older)
    path = cache_path(cache_dir, dataset.name, label, key)
    return (older, key, path) if path.exists() else None


def checkpoint_validation(source: BackboneSource, dataset: ImageDataset) -> dict | None:
    """The validation images (with the seed and fraction that carved them) of a checkpoint fine-tuned on these
    same images, for compare to check its own against; None for other images or a checkpoint that does not say.

    A checkpoint fine-tuned on another split of these images is refused: some of its training images would be
    scored here as validation or test, and the figures would be leaked."""
    trained = source.trained_on
    if not trained or trained.get("images") != dataset.membership():
        return None
    if trained.get("train_val") != dataset.membership(("train", "val")):
        raise ConfigError(
            f"{source.checkpoint}: fine-tuned on another split of these images ({trained.get('split_source')}) than "
            f"this one ({dataset.split_source}), so images it trained on would be scored as validation or test; "
            "give featx extract the split featx finetune used (--split, --seed, --split-from)")
    return trained.get("validation")


def cached_result(path: Path, key: str) -> ExtractResult | None:
    """The cached file at ``path`` if it is complete, made from ``key`` and intact; None to extract it."""
    if not path.exists():
        return None
    meta = read_meta(path)
    if meta.get("cache_key") != key:
        raise ConfigError(f"{path} exists but was made from other inputs (cache key {meta.get('cache_key')} "
                          f"instead of {key}); remove it or choose another --out")
    if not meta["complete"]:
        return None
    # A damaged file is never "cached" (the error says to re-extract with --force). One that verified and has not
    # changed size or time since is not read through again; its chunks' Fletcher32 still guards every later read.
    remembered_of_file("intact", path, lambda: check_intact(path) and "verified")
    log.info("using cached %s", path)
    return ExtractResult(path=path, cached=True, rows=int(meta["n_rows"]), label=meta.get("label") or meta["backbone"],
                         resumed_from=int(meta["n_rows"]))
