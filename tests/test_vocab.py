"""Options and checks declared once: vocab.PARAMETERS types the CLI and checks the configs, in one wording."""

import dataclasses
import inspect
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from featx.cli.commands import main
from featx.errors import ConfigError
from featx.cli.options import param_type
from featx.vocab import PARAMETERS, Interval, Maybe, OneOf, check, parse_layer

FIXTURE = "tests/fixtures/chest_xray_efficientnet_lite0.h5"
# One value each parameter must refuse, and one it must accept.
REFUSED = {"precision": "fp8", "dtype": "int8", "device": "gpu", "fit": "stretch", "decode": "opencv", "aug": "medical", "augment": -1,
           "tta_views": -1, "layer": "stage9", "image_size": 8, "batch_size": 0, "workers": -1, "unfreeze": "7", "bn": "off",
           "epochs": -1, "head_epochs": 1.5, "lr": 0.0, "lr_min": -1e-3, "weight_decay": -0.1, "clip_grad": 0.0, "dropout": 1.0, "drop_path": -0.1,
           "patience": 0, "ema": 1.0, "seed": -1, "split_seed": -1, "val_seed": -1, "val_fraction": 0.9, "cv": 1, "threshold": "youden", "sort_by": "speed",
           "score": "distance", "top_k": 0, "sample_per_class": 1, "max_pixels": 0, "shard_rows": 0, "max_train_rows": 5, "cluster": "my-gpus",
           "align": "mean", "prior_shift": "on", "duplicate_cosine": 0.3, "smooth_test": -1,
           "exclude_leaked": "maybe", "adapt_bn": "sometimes",
           "split": "0.7,nan,0.3", "prefetch": -1, "split_by": "random",
           "format": "csv", "k": 0, "index": "hnsw", "map_method": "pca", "max_points": 5}
ACCEPTED = {"precision": "bf16", "dtype": "float32", "device": "cuda:1", "fit": "full", "decode": "tensor", "aug": "xray", "augment": 2,
            "tta_views": 4, "layer": "stage2, penultimate", "image_size": None, "batch_size": 1, "workers": 0, "unfreeze": "all",
            "bn": "train", "epochs": 0, "head_epochs": 1, "lr": 3e-4, "lr_min": None, "weight_decay": 0.0,
            "clip_grad": 1.0, "dropout": 0.5, "drop_path": None, "patience": 1, "ema": 0.997, "seed": 0, "split_seed": 3, "val_seed": None, "val_fraction": 0.05, "cv": 2,
            "threshold": "sensitivity=0.95", "sort_by": "roc_auc", "score": "max_prob", "top_k": 1,
            "sample_per_class": 2, "max_pixels": 1000, "shard_rows": None, "max_train_rows": 10,
            "cluster": "local:2", "align": "coral", "prior_shift": "auto", "duplicate_cosine": 0.943, "smooth_test": 10,
            "exclude_leaked": True, "adapt_bn": False,
            "split": "0.7,0.15,0.15", "prefetch": 2, "split_by": "path",
            "format": "npy", "k": 1, "index": "faiss", "map_method": "tsne", "max_points": 10}


def test_every_parameter_has_cases_here():
    assert set(REFUSED) == set(PARAMETERS) == set(ACCEPTED)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_one_wording_for_every_parameter_error(name):
    check("somewhere", **{name: ACCEPTED[name]})
    with pytest.raises(ConfigError) as err:
        check("somewhere", **{name: REFUSED[name]})
    expected = rf"The '{name}' parameter of somewhere must be .+\. Got {re.escape(repr(REFUSED[name]))} instead\."
    assert re.fullmatch(expected, str(err.value))


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_the_click_type_refuses_what_the_constraint_refuses(name):
    kind = param_type(name)
    constraint = PARAMETERS[name]
    if ACCEPTED[name] is not None:
        assert kind.convert(str(ACCEPTED[name]), None, None) == ACCEPTED[name]
    if not isinstance(REFUSED[name], float) or isinstance(getattr(constraint, "constraint", constraint), Interval):
        with pytest.raises(click.BadParameter):
            kind.convert(str(REFUSED[name]), None, None)


def cli_options():
    for command in main.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.name in PARAMETERS:
                yield command.name, param


@pytest.mark.parametrize("command, option", list(cli_options()), ids=lambda x: getattr(x, "name", x))
def test_every_option_is_typed_from_the_table(command, option):
    assert option.type.to_info_dict() == param_type(option.name).to_info_dict()


def test_cli_defaults_are_the_library_defaults():
    from featx.comparison.config import CompareConfig
    from featx.embed.extraction import ExtractConfig
    from featx.finetuning.training import FinetuneConfig
    from featx.use.predict import Predictor

    library = {
        "extract": {f.name: f.default for f in dataclasses.fields(ExtractConfig)},
        "finetune": {f.name: f.default for f in dataclasses.fields(FinetuneConfig)},
        "compare": dataclasses.asdict(CompareConfig()),
        "predict": {**{n: p.default for n, p in inspect.signature(Predictor).parameters.items()},
                    **{n: p.default for n, p in inspect.signature(Predictor.predict).parameters.items()}},
    }
    compared = 0
    for command, options in library.items():
        context = click.Context(main.commands[command])
        for param in main.commands[command].params:
            if isinstance(param, click.Option) and param.name in options and param.name != "heads":
                default = param.get_default(context)
                if default is getattr(click.core, "UNSET", None):  # click >= 8.3 marks "no default" so
                    default = None
                default = str(default) if isinstance(default, Path) else default
                assert default == options[param.name], (command, param.name)
                compared += 1
    assert compared >= 30


def test_configs_refuse_bad_values_when_made_not_deep_inside():
    from featx.comparison.evaluate import compare
    from featx.embed.extraction import ExtractConfig
    from featx.finetuning.training import FinetuneConfig

    with pytest.raises(ConfigError, match="The 'batch_size' parameter of extract must be a positive int. Got 0"):
        ExtractConfig(batch_size=0)
    with pytest.raises(ConfigError, match="augmented copies need transforms"):
        ExtractConfig(augment=1, aug="none")
    with pytest.raises(ConfigError, match=r"The 'unfreeze' parameter of finetune must be one of 0, 1, 2, 3, 4, all"):
        FinetuneConfig(unfreeze="7")
    with pytest.raises(ConfigError, match="The 'aug' parameter of finetune"):
        FinetuneConfig(aug="medical")
    with pytest.raises(ConfigError, match="The 'threshold' parameter of compare"):
        compare([FIXTURE], ["logreg"], threshold="youden")  # refused before any head is fitted


def test_cli_refuses_with_the_option_name_and_exit_2():
    result = CliRunner().invoke(main, ["compare", FIXTURE, "--threshold", "youden"])
    assert result.exit_code == 2 and "Invalid value for '--threshold'" in result.output
    assert "must be balanced_accuracy, f1, sensitivity=<0..1> or mixture" in result.output
    result = CliRunner().invoke(main, ["finetune", ".", "--unfreeze", "7"])
    assert result.exit_code == 2 and "'7' is not one of '0', '1', '2', '3', '4', 'all'" in result.output


def test_layer_words():
    assert parse_layer("stages") == ("stage1", "stage2", "stage3", "stage4")
    assert parse_layer("stage3, penultimate,stage3") == ("stage3", "penultimate")
    assert isinstance(PARAMETERS["image_size"], Maybe) and isinstance(PARAMETERS["fit"], OneOf)
