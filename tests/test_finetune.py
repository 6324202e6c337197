import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from featx.errors import ConfigError, DataError
from featx.embed.extraction import ExtractConfig, extract
from featx.embed.checkpoints import read_checkpoint
from featx.finetuning.training import (FinetuneConfig, Trainer, WeightAverage, finetune, group_learning_rates, lr_find,
                              lr_sweep, stage_groups, suggest_lr)
from featx.vocab import STAGE_GROUPS
from featx.store.embeddings import load_embeddings
from tests.conftest import SHARED_DATA, make_class_folders, needs_shared_data

TINY = FinetuneConfig(backbone="resnet18", weights="none", image_size=32, batch_size=8, epochs=2, head_epochs=1,
                      lr=3e-3, aug="none", patience=5)


@pytest.fixture
def colours(tmp_path):
    return make_class_folders(tmp_path / "colours", per_class=8, splits=("train", "val"))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # the default run trains in the resume and checkpoint round-trip tests
def test_loss_decreases_on_a_learnable_task(colours, tmp_path):
    trainer = Trainer(colours, TINY, tmp_path / "run")
    optimizer, scheduler = trainer.optimizer_for("all", 30)
    images, labels = next(iter(trainer.loader(trainer.train_samples, train=True)))
    losses = []
    for _ in range(30):
        trainer.model.train()
        loss = trainer.loss(trainer.model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("unfreeze, trained_groups", [("0", 0), ("1", 1), ("2", 2), ("all", STAGE_GROUPS)])
def test_only_the_intended_parameters_change(colours, tmp_path, unfreeze, trained_groups):
    config = replace(TINY, unfreeze=unfreeze, head_epochs=0, epochs=1)
    trainer = Trainer(colours, config, tmp_path / "run")
    before = {id(p): p.detach().clone() for p in trainer.model.parameters()}
    buffers = {k: v.clone() for k, v in trainer.model.named_buffers()}
    optimizer, scheduler = trainer.optimizer_for(unfreeze, 4)
    trainer.train_epoch(0, optimizer, scheduler, progress=False)
    bn_params = {id(p) for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                 for p in m.parameters()}
    groups = stage_groups(trainer.model, trainer.spec)
    for index, params in enumerate(groups):
        should_train = index == len(groups) - 1 or index >= STAGE_GROUPS - trained_groups
        for p in params:
            changed = not torch.equal(before[id(p)], p.detach())
            assert changed == (should_train and id(p) not in bn_params), (index, p.shape)
    for name, value in trainer.model.named_buffers():  # BatchNorm statistics stay pretrained (bn=frozen)
        assert torch.equal(buffers[name], value), name


def test_discriminative_learning_rates_are_as_asked(colours, tmp_path):
    trainer = Trainer(colours, replace(TINY, lr=1e-3, lr_min=1e-5), tmp_path / "run")
    optimizer, _ = trainer.optimizer_for("all", 10)
    ladder = group_learning_rates(1e-3, 1e-5, STAGE_GROUPS)
    assert ladder == pytest.approx([1e-5, 1e-5 * 100 ** (1 / 3), 1e-5 * 100 ** (2 / 3), 1e-3])
    max_lrs = sorted({round(g["max_lr"], 12) for g in optimizer.param_groups})
    assert max_lrs == pytest.approx(sorted({round(x, 12) for x in ladder}))
    for group in optimizer.param_groups:
        if any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0 and all(p.ndim <= 1 for p in group["params"])
    top_two, _ = trainer.optimizer_for("2", 10)
    assert sorted({round(g["max_lr"], 12) for g in top_two.param_groups}) == pytest.approx(
        sorted({round(x, 12) for x in ladder[2:]}))


def test_resume_after_interruption_gives_the_same_weights(colours, tmp_path):
    config = replace(TINY, aug="natural")
    whole = finetune(colours, config, out=tmp_path / "whole", progress=False)
    assert len(whole.history) == 3
    cut = finetune(colours, config, out=tmp_path / "cut", progress=False, stop_after_epochs=2)
    assert len(cut.history) == 2
    resumed = finetune(colours, config, out=tmp_path / "cut", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "whole" / "history.csv").read_text() == (tmp_path / "cut" / "history.csv").read_text()


def test_the_weight_average_follows_the_steps():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # step 1: decay warmed up to min(0.9, 2 / 11)
    np.testing.assert_allclose(average.weights["weight"], start + 1.0 * (1 - 2 / 11), rtol=1e-6)
    with average.applied(model):
        assert torch.equal(model.weight, average.weights["weight"])
    assert torch.equal(model.weight, start + 1.0)  # the model's own weights are back after the block


@pytest.mark.slow  # five fine-tunes, ~13 s
def test_the_weight_average_is_what_validation_and_best_pt_see_and_survives_a_resume(colours, tmp_path):
    config = replace(TINY, aug="natural", ema=0.9)
    whole = finetune(colours, config, out=tmp_path / "whole", progress=False)
    last = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    finetune(colours, config, out=tmp_path / "one", progress=False, stop_after_epochs=1)
    one_last = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    one_best = torch.load(tmp_path / "one" / "best.pt", weights_only=True)  # epoch 1 is the best so far
    assert torch.equal(one_best["head.weight"], one_last["average"]["weights"]["head.weight"])
    assert not torch.equal(one_best["head.weight"], one_last["model"]["head.weight"])
    plain = finetune(colours, replace(config, ema=None), out=tmp_path / "plain", progress=False)
    assert [h["val_loss"] for h in whole.history] != [h["val_loss"] for h in plain.history]

    # an interrupted run resumes with its average
    finetune(colours, config, out=tmp_path / "cut", progress=False, stop_after_epochs=2)
    finetune(colours, config, out=tmp_path / "cut", resume=True, progress=False)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["average"]
    assert resumed["steps"] == last["average"]["steps"]
    for key, value in last["average"]["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key


def test_lr_finder_restores_the_weights(colours, tmp_path):
    trainer = Trainer(colours, TINY, tmp_path / "run")
    before = snapshot(trainer.model)
    found = lr_find(trainer, steps=30)
    after = snapshot(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert found["valley"] < found["min_loss_lr"] and (tmp_path / "run" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("batch_size, suggestions", [(8, ("valley",)), (32, ("valley", "steepest")),
                                                     (256, ("valley", "steepest"))])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_lr_finder_finds_the_known_good_rate_of_least_squares(batch_size, suggestions, scale):
    """SGD on a mean squared error converges fastest at 1/L (L: the Hessian's largest eigenvalue) and diverges
    beyond 2/L; the suggestions must land within a decade of 1/L, whatever the features' scale.

    With batches of 8 the steepest descent is lost in batch noise; the valley is not.
    """
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=generator) * scale
    y = X @ torch.randn(8, 1, generator=generator)
    good_lr = 1 / float(torch.linalg.eigvalsh(2 * X.T @ X / len(X)).max())
    model = torch.nn.Linear(8, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    batches = [(X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    lrs, losses = lr_sweep(torch.optim.SGD(model.parameters(), lr=1e-7), lambda step: batches,
                           lambda batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]))
    found = suggest_lr(np.array(lrs), np.array(losses))
    for name in suggestions:
        assert good_lr / 10 <= found[name] <= good_lr * 10, (name, found[name], good_lr)


def test_checkpoint_round_trip_into_the_cache(colours, tmp_path):
    whole_image = replace(TINY, fit="full")  # the checkpoint carries its preprocessing into extraction
    result = finetune(colours, whole_image, out=tmp_path / "run", progress=False)
    sidecar = json.loads((tmp_path / "run" / "best.json").read_text())
    assert sidecar["backbone"] == "resnet18" and sidecar["classes"] == ["blue", "green", "red"]
    assert sidecar["metrics"]["epoch"] == result.best_epoch and sidecar["preprocess"]["image_size"] == 32
    assert sidecar["preprocess"]["fit"] == "full"
    _, state = read_checkpoint(tmp_path / "run" / "best.pt")
    trainer = Trainer(colours, whole_image, tmp_path / "other")
    trainer.model.features.net.load_state_dict(state, strict=True)
    emb = load_embeddings(extract(colours, ExtractConfig(checkpoint=str(tmp_path / "run" / "best.pt"),
                                                         cache_dir=str(tmp_path / "cache")), progress=False).path)
    assert emb.label.startswith("resnet18+ft-") and emb.meta["image_size"] == 32 and emb.meta["fit"] == "full"
    first = trainer.dataset.absolute_path(trainer.dataset.samples[0])
    from featx.data.images import load_image

    image = torch.from_numpy(load_image(first, trainer.preprocess).copy()).permute(2, 0, 1)[None]
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model.features(image).numpy()[0]
    np.testing.assert_allclose(emb.features()[0], expected, rtol=2e-2, atol=2e-2)  # float16 storage
    frozen = extract(colours, ExtractConfig(backbone="resnet18", weights="none", image_size=32,
                                            cache_dir=str(tmp_path / "cache")), progress=False)
    assert frozen.path != emb.path  # the fine-tuned backbone caches under its own key


def test_foreign_checkpoints_are_refused(colours, tmp_path):
    finetune(colours, TINY, out=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="is a resnet18 checkpoint; drop --backbone resnet34"):
        extract(colours, ExtractConfig(backbone="resnet34", checkpoint=str(tmp_path / "run" / "best.pt"),
                                       cache_dir=str(tmp_path / "c")), progress=False)
    with pytest.raises(DataError, match="made for backbone 'resnet18', not 'resnet34'"):
        finetune(colours, replace(TINY, backbone="resnet34"), out=tmp_path / "run", resume=True, progress=False)
    shutil.rmtree(colours / "train" / "red")
    shutil.rmtree(colours / "val" / "red")
    with pytest.raises(DataError, match=r"made for classes \['blue', 'green', 'red'\], not \['blue', 'green'\]"):
        finetune(colours, TINY, out=tmp_path / "run", resume=True, progress=False)
    (tmp_path / "fake.pt").write_bytes(b"x")
    (tmp_path / "fake.json").write_text("{}")
    with pytest.raises(DataError, match="not a featx checkpoint"):
        read_checkpoint(tmp_path / "fake.pt")


def test_head_warm_start_from_a_logreg_run(colours, tmp_path):
    from featx.comparison.evaluate import compare
    from featx.heads.registry import load_head
    from featx.comparison.runs import save_run

    emb = load_embeddings(extract(colours, ExtractConfig(backbone="resnet18", weights="none", image_size=32,
                                                         cache_dir=str(tmp_path / "cache")), progress=False).path)
    save_run(compare([emb], ["logreg"]), tmp_path / "lr-run")
    trainer = Trainer(colours, replace(TINY, init_head_from=str(tmp_path / "lr-run")), tmp_path / "ft")
    head = load_head(next((tmp_path / "lr-run" / "heads").glob("*.json")))
    features = emb.features("val")
    with torch.no_grad():
        proba = trainer.model.head(torch.from_numpy(features)).softmax(1).numpy()
    np.testing.assert_allclose(proba, head["pipeline"].predict_proba(features), atol=1e-4)


@pytest.mark.slow  # three fine-tunes and two runs, ~7 s
def test_guessed_labels_train_never_validate_are_never_read_as_truth_and_flag_test_figures(tmp_path, caplog):
    import csv

    from click.testing import CliRunner

    from featx.cli.commands import main
    from featx.comparison.evaluate import compare
    from featx.comparison.runs import predictions_path, save_run

    data = make_class_folders(tmp_path / "colours", per_class=4, splits=("train", "val", "test"))
    emb = load_embeddings(extract(data, ExtractConfig(backbone="resnet18", weights="none", image_size=32,
                                                      cache_dir=str(tmp_path / "cache")), progress=False).path)
    save_run(compare([emb], ["logreg"]), tmp_path / "teacher")
    written = predictions_path(tmp_path / "teacher", emb.path.name, "logreg", "test")
    rows = list(csv.DictReader(written.open()))
    assert {"path", "truth", "predicted"} <= set(rows[0]) and len(rows) == 12
    # every guess "blue" and every truth unreadable: the students learn the guesses, and a read truth would fail
    guesses = tmp_path / "guesses.csv"
    with guesses.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "predicted": "blue", "truth": "no such class"} for row in rows)
    trainer = Trainer(data, replace(TINY, pseudo_labels=str(guesses)), tmp_path / "ft")
    test_paths = {row["path"] for row in rows}
    pseudo = [s for s in trainer.train_samples if s.path in test_paths]
    assert len(pseudo) == 12 and {s.label for s in pseudo} == {trainer.classes.index("blue")}
    assert not test_paths & {s.path for s in trainer.val_samples}
    assert len(trainer.train_samples) == 12 + 12

    result = CliRunner().invoke(main, ["finetune", str(data), "--backbone", "resnet18", "--weights", "none",
                                       "--image-size", "32", "--batch-size", "8", "--head-epochs", "0", "--epochs",
                                       "1", "--aug", "none", "--pseudo-labels", str(written), "--out",
                                       str(tmp_path / "student")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "student" / "best.json").read_text())["pseudo_labels"]
    assert record["rows"] == 12 and record["splits"] == {"test": 12} and sum(record["classes"].values()) == 12
    # its embeddings carry that on, and compare and the report say the test figures are transductive
    student = load_embeddings(extract(data, ExtractConfig(checkpoint=str(tmp_path / "student" / "best.pt"),
                                                          cache_dir=str(tmp_path / "cache")), progress=False).path)
    assert student.meta["backbone_pseudo_labels"] == record
    from featx.embed.planning import plan_extraction

    unmarked = tmp_path / "unmarked"  # the same weights without the record must not reuse the marked file
    shutil.copytree(tmp_path / "student", unmarked)
    sidecar = json.loads((unmarked / "best.json").read_text())
    (unmarked / "best.json").write_text(json.dumps({k: v for k, v in sidecar.items() if k != "pseudo_labels"}))
    assert plan_extraction(data, ExtractConfig(checkpoint=str(unmarked / "best.pt"))).key != student.cache_key
    (unmarked / "best.json").write_text(json.dumps({**sidecar, "pseudo_labels": "many"}))
    with pytest.raises(DataError, match="pseudo_labels is not the record featx finetune writes"):
        plan_extraction(data, ExtractConfig(checkpoint=str(unmarked / "best.pt")))
    with caplog.at_level("WARNING", logger="featx.comparison.evaluate"):
        board = compare([student, emb], ["logreg"])
    assert "trained on 12 test images with guessed labels" in caplog.text and caplog.text.count("guessed") == 1
    assert board.settings["transductive"] == {student.path.name: {"test_images_trained_on": 12}}
    from featx.use.report import write_report

    save_run(board, tmp_path / "judged")
    assert "Transductive test figures" in write_report(tmp_path / "judged").read_text()

    for text, problem in (("path,predicted\ntrain/red/red_00.jpg,red\n", "train/red/red_00.jpg is a train image"),
                          ("path,predicted\ntest/red/red_00.jpg,purple\n", "unknown class 'purple'"),
                          ("path,predicted\ntest/red/red_99.jpg,red\n", "is not an image of"),
                          ("path,label\ntest/red/red_00.jpg,red\n", "must name the columns path, predicted")):
        guesses.write_text(text)
        with pytest.raises(DataError, match=f"{guesses.name}(:2)?: .*{problem}"):
            Trainer(data, replace(TINY, pseudo_labels=str(guesses)), tmp_path / "ft")


def test_a_checkpoint_is_embedded_only_under_the_split_it_trained_on(tmp_path):
    """Data without a split: the training seed never moves the split featx draws, and extracting with a
    checkpoint fine-tuned on another split of the same images is refused (it would score images it trained on)."""
    from click.testing import CliRunner

    from featx.cli.commands import main

    flat = make_class_folders(tmp_path / "flat", per_class=10)
    one_epoch = replace(TINY, head_epochs=0, epochs=1)
    drawn = [{(s.path, s.split) for s in Trainer(flat, config, tmp_path / "t").dataset.samples}
             for config in (one_epoch, replace(one_epoch, seed=1), replace(one_epoch, split_seed=1))]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]
    finetune(flat, replace(one_epoch, split_seed=1), out=tmp_path / "seed1", progress=False)
    trained_on = json.loads((tmp_path / "seed1" / "best.json").read_text())["trained_on"]
    assert trained_on["split_source"] == "stratified 0.7,0.15,0.15 seed=1"
    checkpoint = str(tmp_path / "seed1" / "best.pt")
    config = ExtractConfig(checkpoint=checkpoint, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"best.pt: fine-tuned on another split of these images \(stratified "
                                          r"0.7,0.15,0.15 seed=1\) than this one \(stratified 0.7,0.15,0.15 seed=0\)"):
        extract(flat, config, progress=False)
    result = CliRunner().invoke(main, ["extract", str(flat), "--checkpoint", checkpoint, "--out",
                                       str(tmp_path / "cache")])
    assert result.exit_code == 2 and "images it trained on would be scored as validation or test" in result.output
    assert extract(flat, config, seed=1, progress=False).rows == 30  # under the split it trained on
    other = make_class_folders(tmp_path / "other", per_class=3)  # other images: a new dataset, nothing to refuse
    assert extract(other, config, progress=False).rows == 9


@pytest.mark.slow  # two fine-tunes and a compare, ~6 s
def test_compare_says_when_its_validation_images_trained_the_fine_tuned_backbone(tmp_path, caplog):
    """finetune carves validation with its --seed; compare carving with another one validates on images the
    backbone trained on: it warns, records it and the report says so. With the fine-tune's seed it is silent,
    and a checkpoint applied to other images records nothing to check against."""
    from featx.comparison.evaluate import compare
    from featx.use.report import write_report
    from featx.comparison.runs import save_run

    data = make_class_folders(tmp_path / "data", per_class=20, splits=("train", "test"))
    finetune(data, replace(TINY, head_epochs=0, epochs=1), out=tmp_path / "ft", progress=False)
    config = ExtractConfig(checkpoint=str(tmp_path / "ft" / "best.pt"), cache_dir=str(tmp_path / "cache"))
    emb = load_embeddings(extract(data, config, progress=False).path)
    held_out = emb.meta["backbone_validation"]
    assert (held_out["seed"], held_out["val_fraction"], len(held_out["images"])) == (0, 0.15, 9)

    with caplog.at_level("WARNING", logger="featx.comparison.evaluate"):
        assert "validation_trained_on" not in compare([emb], ["logreg"], seed=0).settings
        assert "trained its fine-tuned backbone" not in caplog.text
        board = compare([emb], ["logreg"], seed=1)
    leaked = board.settings["validation_trained_on"][emb.path.name]
    assert leaked["of"] == 9 and 0 < leaked["images"] <= 9 and leaked["finetune_seed"] == 0
    assert f"{leaked['images']} of its 9 validation images trained its fine-tuned backbone" in caplog.text
    save_run(board, tmp_path / "run")
    assert "Optimistic validation" in write_report(tmp_path / "run").read_text()

    other = make_class_folders(tmp_path / "other", per_class=6, splits=("train", "test"))
    assert "backbone_validation" not in load_embeddings(extract(other, config, progress=False).path).meta


@pytest.mark.slow  # three fine-tunes, ~10 s
def test_runs_with_several_seeds_hold_out_one_validation_with_val_seed(tmp_path, caplog):
    """An ensemble over training seeds is validated cleanly only on images none of its runs trained on:
    --val-seed fixes the carve while --seed still moves the head's start and the batch order."""
    from click.testing import CliRunner

    from featx.cli.commands import main
    from featx.comparison.evaluate import compare

    data = make_class_folders(tmp_path / "data", per_class=20, splits=("train", "test"))
    one_epoch = replace(TINY, head_epochs=0, epochs=1)
    trainers = [Trainer(data, replace(one_epoch, seed=seed, val_seed=val_seed), tmp_path / "t")
                for seed, val_seed in ((0, None), (1, 0), (1, None))]
    held_out = [{s.path for s in trainer.val_samples} for trainer in trainers]
    assert held_out[0] == held_out[1] != held_out[2]
    assert not torch.equal(trainers[0].model.head.weight, trainers[1].model.head.weight)

    cache = tmp_path / "cache"
    members = []
    for seed in ("0", "1"):
        result = CliRunner().invoke(main, ["finetune", str(data), "--backbone", "resnet18", "--weights", "none",
                                           "--image-size", "32", "--batch-size", "8", "--head-epochs", "0",
                                           "--epochs", "1", "--aug", "none", "--seed", seed, "--val-seed", "0",
                                           "--out", str(tmp_path / f"seed{seed}")])
        assert result.exit_code == 0, result.output
        config = ExtractConfig(checkpoint=str(tmp_path / f"seed{seed}" / "best.pt"), cache_dir=str(cache))
        members.append(load_embeddings(extract(data, config, progress=False).path))
    assert members[0].cache_key != members[1].cache_key
    listing = CliRunner().invoke(main, ["ls", str(cache)]).output  # which run each file came from
    assert all(f"32 px crop, from {tmp_path / f'seed{seed}' / 'best.pt'}" in listing for seed in (0, 1))
    assert members[0].meta["backbone_validation"] == members[1].meta["backbone_validation"]
    assert members[1].meta["backbone_validation"]["seed"] == 0
    with caplog.at_level("WARNING", logger="featx.comparison.evaluate"):
        board = compare(members, ["logreg"], seed=0, ensemble=True)
    assert "validation_trained_on" not in board.settings and "trained its fine-tuned backbone" not in caplog.text
    assert any("averaged" in row["backbone"] for row in board.rows)

    # a run with its own carve cannot be validated together with them: compare says so, and what to do
    finetune(data, replace(one_epoch, seed=1), out=tmp_path / "own", progress=False)
    own = load_embeddings(extract(data, ExtractConfig(checkpoint=str(tmp_path / "own" / "best.pt"),
                                                      cache_dir=str(cache)), progress=False).path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="featx.comparison.evaluate"):
        compare([members[0], own], ["logreg"], seed=0, ensemble=True)
    assert "held out different validation images (carved with seeds 0 (fraction 0.15), 1 (fraction 0.15))" \
        in caplog.text and "one --val-seed" in caplog.text


@pytest.mark.slow  # ~5 s
def test_noise_trains_and_leaves_no_trace_in_the_weights(colours, tmp_path):
    """Dropout and stochastic depth (Noisy Student's noise) act in training only and add no weights."""
    noisy = replace(TINY, backbone="efficientnet_lite0", dropout=0.5, drop_path=0.2, epochs=1)
    trainer = Trainer(colours, noisy, tmp_path / "run")
    depth = [m.drop_prob for m in trainer.model.modules() if type(m).__name__ == "DropPath"]
    assert len(depth) > 5 and 0.15 < max(depth) <= 0.2 and depth == sorted(depth)  # rising with depth
    images, _ = next(iter(trainer.loader(trainer.train_samples, train=False)))
    trainer.model.train()
    with torch.no_grad():
        assert not torch.allclose(trainer.model(images), trainer.model(images))
        trainer.model.eval()
        assert torch.equal(trainer.model(images), trainer.model(images))
    plain = Trainer(colours, replace(noisy, dropout=0.0, drop_path=None), tmp_path / "plain")
    assert not any(type(m).__name__ == "DropPath" for m in plain.model.modules())
    assert trainer.model.state_dict().keys() == plain.model.state_dict().keys()

    finetune(colours, noisy, out=tmp_path / "run", progress=False)
    sidecar = json.loads((tmp_path / "run" / "best.json").read_text())
    assert sidecar["config"]["dropout"] == 0.5 and sidecar["config"]["drop_path"] == 0.2
    emb = extract(colours, ExtractConfig(checkpoint=str(tmp_path / "run" / "best.pt"),
                                         cache_dir=str(tmp_path / "cache")), progress=False)
    assert load_embeddings(emb.path).features().shape[1] == 1280  # loads into a model built without noise

    with pytest.raises(ConfigError, match="--drop-path: backbone 'resnet18' has no stochastic depth"):
        Trainer(colours, replace(TINY, drop_path=0.2), tmp_path / "resnet")
    Trainer(colours, replace(TINY, drop_path=0.0), tmp_path / "resnet")  # none asked, none there: fine
    own = [m.p for m in Trainer(colours, replace(TINY, backbone="efficientnet_b0"), tmp_path / "b0").model.modules()
           if type(m).__name__ == "StochasticDepth"]
    off = [m.p for m in Trainer(colours, replace(TINY, backbone="efficientnet_b0", drop_path=0.0),
                                tmp_path / "b0").model.modules() if type(m).__name__ == "StochasticDepth"]
    assert max(own) > 0.15 and max(off) == 0  # torchvision's EfficientNet has its own 0.2; 0 turns it off
    with pytest.raises(ConfigError, match="The 'dropout' parameter"):
        Trainer(colours, replace(TINY, dropout=1.5), tmp_path / "bad")


def test_bad_settings_are_refused(colours, tmp_path):
    with pytest.raises(ConfigError, match="The 'unfreeze' parameter"):
        Trainer(colours, replace(TINY, unfreeze="7"), tmp_path).optimizer_for("7", 1)
    with pytest.raises(ConfigError, match="The 'aug' parameter"):
        Trainer(colours, replace(TINY, aug="medical"), tmp_path).loader([], train=True)
    with pytest.raises(ConfigError, match="The 'fit' parameter"):
        Trainer(colours, replace(TINY, fit="stretch"), tmp_path)
    with pytest.raises(DataError, match="nothing to resume"):
        finetune(colours, TINY, out=tmp_path / "empty", resume=True, progress=False)


@pytest.mark.slow
@needs_shared_data("chest_xray")
def test_real_chest_xray_subset_fine_tunes(tmp_path):
    root = tmp_path / "xray"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / "train" / label).mkdir(parents=True)
        for path in sorted((SHARED_DATA / "chest_xray" / "train" / label).glob("*.jpeg"))[:120]:
            shutil.copy(path, root / "train" / label / path.name)
    config = FinetuneConfig(unfreeze="2", epochs=2, image_size=160, aug="xray", batch_size=16)
    result = finetune(root, config, out=tmp_path / "run", progress=False)
    assert result.best_metrics["val_accuracy"] > 0.75
    assert (tmp_path / "run" / "history.png").exists()


def test_fine_tuning_validates_on_the_images_the_heads_validate_on(tmp_path):
    """Without a val split both carve one from train: the same images, so their validation figures compare."""
    from featx.comparison.evaluate import split_arrays

    data = make_class_folders(tmp_path / "colours", per_class=10, splits=("train", "test"))
    trainer = Trainer(data, TINY, tmp_path / "ft")
    emb = load_embeddings(extract(data, ExtractConfig(backbone="resnet18", weights="none", image_size=32,
                                                      cache_dir=str(tmp_path / "cache")), progress=False).path)
    X_val = split_arrays(emb, TINY.val_fraction, TINY.seed).val.features
    path_of = {row.tobytes(): path for row, path in zip(emb.features("train"), emb.paths_of("train"))}
    assert len(X_val) == len(trainer.val_samples) == 5  # 15 % of 30, rounded up
    assert {path_of[row.tobytes()] for row in X_val} == {s.path for s in trainer.val_samples}


def test_fine_tuning_decodes_in_process_on_a_cpu_unless_asked(colours, tmp_path):
    on_cpu = replace(TINY, device="cpu")
    assert Trainer(colours, on_cpu, tmp_path / "a").loader([], train=False).num_workers == 0
    assert Trainer(colours, replace(on_cpu, workers=2), tmp_path / "b").loader([], train=False).num_workers == 2
