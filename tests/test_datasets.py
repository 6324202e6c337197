import os
import shutil
from collections import Counter

import pytest

from featx.data import datasets
from featx.data.datasets import scan_dataset
from featx.errors import ConfigError, DataError
from tests.conftest import make_class_folders, make_image


def test_class_folders_get_a_seeded_stratified_split(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=20)
    ds = scan_dataset(root, split="0.7,0.15,0.15", seed=0)
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds) == 60
    per_split_class = Counter((s.split, s.label) for s in ds.samples)
    for label in range(3):
        assert per_split_class[("train", label)] == 14
        assert per_split_class[("val", label)] == 3
        assert per_split_class[("test", label)] == 3
    again = scan_dataset(root, split="0.7,0.15,0.15", seed=0)
    other = scan_dataset(root, split="0.7,0.15,0.15", seed=1)
    assert [s.split for s in again.samples] == [s.split for s in ds.samples]
    assert [s.split for s in other.samples] != [s.split for s in ds.samples]
    assert "seed=0" in ds.split_source


def test_default_split_applies_when_none_is_given(tmp_path):
    ds = scan_dataset(make_class_folders(tmp_path / "d", per_class=20))
    assert {s.split for s in ds.samples} == {"train", "val", "test"}


def test_split_folders_are_used_as_given(tmp_path):
    root = tmp_path / "d"
    make_class_folders(root, per_class=2, splits=("train", "valid", "test"))
    ds = scan_dataset(root)
    assert ds.split_source == "split folders"
    assert Counter(s.split for s in ds.samples) == {"train": 6, "val": 6, "test": 6}
    assert all(s.path.startswith(("train/", "valid/", "test/")) for s in ds.samples)
    with pytest.raises(ConfigError, match="already defines splits"):
        scan_dataset(root, split="0.8,0.1,0.1")


def test_csv_with_groups_keeps_each_group_in_one_split(tmp_path):
    rows = ["path,label,group"]
    for patient in range(30):
        for view in range(3):
            name = f"img/p{patient}_{view}.png"
            make_image(tmp_path / name, (patient * 8, 0, 0), fmt="PNG")
            rows.append(f"{name},{'sick' if patient % 2 else 'healthy'},p{patient}")
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    ds = scan_dataset(tmp_path / "index.csv", split="0.6,0.2,0.2", seed=3)
    splits_of_group = {}
    for s in ds.samples:
        splits_of_group.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in splits_of_group.values())
    assert Counter(s.split for s in ds.samples) == {"train": 54, "val": 18, "test": 18}
    assert "by group" in ds.split_source


def test_csv_split_column_and_errors(tmp_path):
    for i in range(4):
        make_image(tmp_path / f"a{i}.png", (0, 0, 0), fmt="PNG")
    (tmp_path / "data.csv").write_text("path,label,split\na0.png,x,train\na1.png,y,train\na2.png,x,test\na3.png,y,val\n")
    ds = scan_dataset(tmp_path / "data.csv")
    assert [s.split for s in ds.samples] == ["train", "train", "test", "val"]
    (tmp_path / "bad.csv").write_text("file,class\na0.png,x\n")
    with pytest.raises(DataError, match=r"bad.csv: the header must name the columns label, path"):
        scan_dataset(tmp_path / "bad.csv")
    (tmp_path / "badsplit.csv").write_text("path,label,split\na0.png,x,training\n")
    with pytest.raises(DataError, match=r"badsplit.csv:2: unknown split 'training'"):
        scan_dataset(tmp_path / "badsplit.csv")


def test_split_from_csv(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=2)
    ds = scan_dataset(root)
    lines = ["path,split"] + [f"{s.path},{'test' if i % 2 else 'train'}" for i, s in enumerate(ds.samples)]
    (tmp_path / "splits.csv").write_text("\n".join(lines))
    again = scan_dataset(root, split_from=tmp_path / "splits.csv")
    assert [s.split for s in again.samples] == ["test" if i % 2 else "train" for i in range(len(ds))]


def test_fingerprint_follows_contents_not_file_times(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=3)
    first = scan_dataset(root).fingerprint()
    assert scan_dataset(root).fingerprint() == first
    make_image(root / "red" / "extra.jpg", (200, 0, 0), seed=99)
    added = scan_dataset(root).fingerprint()
    assert added != first
    target = root / "red" / "extra.jpg"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert scan_dataset(root).fingerprint() == added  # a new timestamp is not a new image
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "d", copy_function=shutil.copyfile)  # new times
    assert scan_dataset(copy).fingerprint() == added
    make_image(target, (0, 0, 200), seed=98)
    assert scan_dataset(root).fingerprint() != added
    assert scan_dataset(root, seed=5).fingerprint() != scan_dataset(root).fingerprint()


def test_fingerprint_reads_the_images_again_only_when_their_files_changed(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "d", per_class=3)
    hashed = []
    content_sha256 = datasets._content_sha256
    monkeypatch.setattr(datasets, "_content_sha256", lambda path: hashed.append(path) or content_sha256(path))
    first = scan_dataset(root).fingerprint()
    assert len(hashed) == 9
    assert scan_dataset(root).fingerprint() == first and len(hashed) == 9  # remembered: only stats
    os.utime(root / "red" / "red_00.jpg")
    assert scan_dataset(root).fingerprint() == first and len(hashed) == 18
    assert scan_dataset(root, verify_content=True).fingerprint() == first and len(hashed) == 27


@pytest.mark.parametrize("split", ["0.5,0.6,0.1", "1,2,3,4", "-0.1,0.6,0.5", "abc"])
def test_bad_split_fractions(tmp_path, split):
    root = make_class_folders(tmp_path / "d", per_class=2)
    with pytest.raises(ConfigError, match="The 'split' parameter"):
        scan_dataset(root, split=split)


def test_empty_or_missing_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="expected one folder per class"):
        scan_dataset(tmp_path / "empty")


def test_one_image_listing_for_datasets_and_predict(tmp_path):
    from featx.data.datasets import list_images

    root = make_class_folders(tmp_path / "d", per_class=2)
    (root / "red" / "._red_00.jpg").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork, not an image
    (root / "red" / "notes.txt").write_text("not an image")
    listed = list_images([root])
    assert len(listed) == 6 and not any(p.name.startswith(".") for p in listed)
    assert [p.relative_to(root).as_posix() for p in listed] == [s.path for s in scan_dataset(root).samples]
    single = root / "red" / "red_00.jpg"
    assert list_images([single, root / "blue"]) == [single, root / "blue" / "blue_00.jpg", root / "blue" / "blue_01.jpg"]
    with pytest.raises(DataError, match="no such file or folder"):
        list_images([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in"):
        list_images([tmp_path / "empty"])


def test_a_split_by_path_never_moves_an_image_when_images_are_added(tmp_path):
    """1,000 names in three classes, then 10 % more: every image keeps its split, and each class's shares stay
    within a binomial sample's spread of the fractions (a split that decides each image alone cannot be exact)."""
    sizes = {"a": 500, "b": 300, "c": 200}
    for name, count in sizes.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{name}{i:04d}.jpg").write_bytes(b"x")
    before = scan_dataset(tmp_path, split_by="path", seed=3)
    assert before.split_source == "hashed 0.7,0.15,0.15 seed=3"
    for name, count in sizes.items():
        for i in range(count, count + count // 10):
            (tmp_path / name / f"{name}{i:04d}.jpg").write_bytes(b"x")
    after = scan_dataset(tmp_path, split_by="path", seed=3)
    placed = {s.path: s.split for s in after.samples}
    assert len(after.samples) == 1100 and all(placed[s.path] == s.split for s in before.samples)
    for label, name in enumerate(after.classes):
        splits = [s.split for s in after.samples if s.label == label]
        for split, fraction in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
            spread = (fraction * (1 - fraction) / len(splits)) ** 0.5
            assert abs(splits.count(split) / len(splits) - fraction) < 4 * spread, (name, split)
    reseeded = scan_dataset(tmp_path, split_by="path", seed=4)
    assert [s.split for s in reseeded.samples] != [s.split for s in after.samples]
    shuffled = scan_dataset(tmp_path, seed=3)  # the default cuts each class exactly, and moves images instead
    for label, count in enumerate(sizes.values()):
        tested = sum(s.split == "test" and s.label == label for s in shuffled.samples)
        assert abs(tested - count * 1.1 * 0.15) <= 1
