"""How to fine-tune: ``FinetuneConfig``, one field per option of ``featx finetune``, torch-free.

Each field declares its default, its constraint (``vocab.PARAMETERS``, by name) and its help text; the
command-line options are made from the fields (``featx.cli.options.config_options``).
"""

from __future__ import annotations

from dataclasses import dataclass

from featx.embed.backbones import DEFAULT_BACKBONE
from featx.errors import ConfigError
from featx.vocab import check_fields, setting, shared_setting


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str = setting(DEFAULT_BACKBONE, "Registered backbone (see `featx list`) or timm:<model>.",
                            metavar="NAME")
    weights: str | None = shared_setting("weights", None)
    unfreeze: str = setting("all", "Backbone stages trained after the head-only epochs, from the top; 0 trains the "
                                   "head only.")
    epochs: int = setting(4, "Epochs with the stages unfrozen.")
    head_epochs: int = setting(1, "Epochs training the new head alone first (fastai's freeze_epochs).")
    lr: float = setting(3e-4, "Peak one-cycle LR of the head and the top stage (fastai's slice(lr_min, lr)).")
    lr_min: float | None = setting(None, "Peak LR of the earliest stage (default lr/100); stages in between are "
                                         "spaced geometrically.")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on norms, biases).")
    bn: str = setting("frozen", "BatchNorm: keep pretrained statistics and affine (frozen, Keras' advice) or train "
                                "them.")
    dropout: float = setting(0.0, "Dropout before the new head while training (fastai's ps; Noisy Student used 0.5).")
    drop_path: float | None = setting(
        None, "Stochastic depth while training: residual blocks skipped at a rate rising with depth to about RATE "
              "(EfficientNets, ConvNeXt, most timm: models; Noisy Student used 0.2). Default: the architecture's own "
              "(none; torchvision's EfficientNets 0.2).", metavar="RATE")
    clip_grad: float = setting(1.0, "Clip the gradients' norm to this before each step.")
    aug: str = setting("natural", "Training augmentation; xray never flips left-right.")
    batch_size: int = shared_setting("batch_size", 32)
    image_size: int | None = shared_setting("image_size", None)
    fit: str = shared_setting("fit", "crop")
    patience: int = setting(2, "Early stop after this many epochs without a better validation loss.")
    ema: float | None = setting(None, "Keep an exponential moving average of the weights (e.g. 0.997: about the last "
                                      "330 steps); validation, early stopping and best.pt use it. Default: the "
                                      "weights as trained.", metavar="DECAY")
    class_weights: bool = setting(True, "Weight the loss by inverse class frequency.",
                                  flag="--class-weights/--no-class-weights")
    init_head_from: str | None = setting(None, "A featx train/compare run whose logreg head (same backbone) starts "
                                               "the new head.", path="folder")
    pseudo_labels: str | None = setting(
        None, "Self-training: also train on DATA_DIR's images outside train and val (test, or unlabelled), each "
              "labelled by a featx run's prediction: a CSV with path and predicted columns, such as compare's "
              "RUN/predictions/<file>__<head>_test.csv (its truth column is never read). Test figures of the result "
              "are then transductive.", path="file")
    split: str | None = setting(None, "Fractions for a stratified split when the data has none (default "
                                      "0.7,0.15,0.15), as featx extract's --split: give both commands the same split.",
                                metavar="TRAIN,VAL,TEST")
    split_seed: int = setting(0, "Seed of that split (featx extract's --seed); --seed never moves it.")
    split_from: str | None = setting(None, "CSV with path,split columns giving each image's split, as featx "
                                           "extract's --split-from.", path="file")
    split_by: str = setting("shuffle", "How that split is drawn, as featx extract's --split-by: shuffle or path.")
    val_fraction: float = shared_setting("val_fraction", 0.15)
    seed: int = setting(0, "Seed for the head's initialisation, the batch order and augmentation, and the carved "
                           "validation split unless --val-seed is given.")
    val_seed: int | None = setting(None, "Seed for the carved validation split alone, when runs with several --seed "
                                         "values must hold out the same images: then `compare --seed VAL_SEED "
                                         "--ensemble` averages them on validation none of them trained on.  "
                                         "[default: --seed]")
    device: str = shared_setting("device", "auto")
    precision: str = shared_setting("precision", "auto")
    workers: int | None = setting(None, "DataLoader worker processes for decoding and augmentation (default: as many "
                                        "as extraction uses on a GPU, none on a CPU).")

    def __post_init__(self):
        check_fields(self, "finetune")
        if self.epochs == 0 and (self.head_epochs == 0 or self.unfreeze == "0"):
            raise ConfigError("nothing to train: epochs is 0 (and head_epochs is 0, or only the head trains)")

    @property
    def validation_seed(self) -> int:
        return self.seed if self.val_seed is None else self.val_seed
