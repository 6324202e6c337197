"""Finding images and their labels on disk, and assigning train/val/test splits.

Three layouts are understood: class folders (``root/<class>/*.jpg``), split folders
(``root/{train,val,test}/<class>/*.jpg``) and a CSV with ``path,label[,split[,group]]``.
When no split is given, a stratified split is drawn with a seed (group-aware when a
group column exists), so the same command always yields the same rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featx.errors import ConfigError, DataError
from featx.store.memo import file_sha256, remembered
from featx.data.remote import is_url, read_bytes, require_fsspec, state
from featx.vocab import Fractions, check

log = logging.getLogger(__name__)

# Raster formats Pillow reads (its stubs, vector, video and container formats left out; AVIF where Pillow has it).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp", ".avif",
     ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi"}
)
RUN_MARKER = "run.json"  # featx.comparison.runs.RUN_FILE: a folder holding it is a run, never images of a dataset
SPLITS = ("train", "val", "test")
# Folder names people use for the validation split, all read as "val".
SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DEFAULT_SPLIT = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root, class index, split and group."""

    path: str
    label: int
    split: str
    group: str = ""


@dataclass
class ImageDataset:
    """An ordered list of samples with the class names and how the split was made."""

    root: Path
    name: str
    classes: list[str]
    samples: list[Sample]
    split_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of what the scan left out
    verify_content: bool = False  # hash every file again rather than trust the remembered hashes
    _fingerprint: str | None = field(default=None, repr=False)
    _contents: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def absolute_path(self, sample: Sample) -> Path | str:
        """Where the image is read from: under the root, or the URL itself."""
        return sample.path if is_url(sample.path) else self.root / sample.path

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, for summaries."""
        table: dict[str, Counter] = defaultdict(Counter)
        for s in self.samples:
            table[s.split or "-"][self.classes[s.label] if s.label >= 0 else "?"] += 1
        return {split: dict(sorted(c.items())) for split, c in table.items()}

    def membership(self, splits: tuple[str, ...] | None = None) -> str:
        """Hash of which images (paths and labels) are in ``splits``, or in the dataset; blind to file times.

        Two scans of the same images split differently agree on ``membership()`` and differ on
        ``membership(("train", "val"))``: how a checkpoint's training images are told from another split's.
        """
        chosen = sorted(f"{s.path}\0{s.label}" for s in self.samples if splits is None or s.split in splits)
        return hashlib.sha256("\n".join(chosen).encode("utf-8", "surrogateescape")).hexdigest()

    @property
    def fingerprint_method(self) -> str:
        return ("paths, labels, splits and the SHA-256 of every file" + ("" if self.verify_content else
                ", remembered while each file's size, modification and change times stay the same"))

    def fingerprint(self) -> str:
        """Hash of relative paths, labels, splits and every file's content: what the cache key knows of the data.

        Content, not file times, so a copy, a fresh checkout or a restore keeps its cached files. The hash is
        remembered under the files' sizes, modification and change times (a write, even one that puts an old
        timestamp back, moves the change time), so a later scan only stats them; ``verify_content`` reads every
        file again whatever is remembered. URLs are identified by what their storage says (size and ETag).
        """
        if self._fingerprint is None:
            if self.verify_content:
                self._fingerprint = self._digest(self.contents())
            else:
                stats = [_stat(self.absolute_path(s)) for s in self.samples]
                self._fingerprint = remembered(f"dataset:{self.root.resolve()}:{self._digest(stats)}",
                                               lambda: self._digest(self.contents()))
        return self._fingerprint

    def contents(self) -> list[str]:
        """Each sample's content identity (``sha256:<hex>`` of the file; for a URL what its storage says, unless
        ``verify_content``), read once per scan: what an embedding file's rows are reused by."""
        if self._contents is None:
            from tqdm.auto import tqdm  # imported only to hash: a warm scan stays light

            places = [self.absolute_path(s) for s in self.samples]
            shown = log.isEnabledFor(logging.INFO) and sys.stderr.isatty()  # as the CLI's progress bars
            self._contents = [state(p) if is_url(p) and not self.verify_content else _content_sha256(p)
                              for p in tqdm(places, desc="fingerprint", unit="img", delay=2, disable=not shown)]
        return self._contents

    def fingerprint_by_times(self) -> str:
        """The fingerprint of files cached before featx 0.3 (sizes and modification times), so they are still found."""
        return self._digest(_stat(p) if is_url(p) else _stat(p).rsplit("\0", 1)[0]
                            for p in map(self.absolute_path, self.samples))

    def _digest(self, identities) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(self.classes).encode())
        for s, identity in zip(self.samples, identities):
            digest.update(f"{s.path}\0{identity}\0{s.label}\0{s.split}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


def _stat(path: Path | str) -> str:
    """Size, modification and change times of a file; for a URL, what its storage says."""
    if is_url(path):
        return state(path)
    try:
        st = path.stat()
        return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    except OSError:
        return "-1\0-1\0-1"


def _content_sha256(path: Path | str) -> str:
    try:
        return "sha256:" + (hashlib.sha256(read_bytes(path)).hexdigest() if is_url(path) else file_sha256(path))
    except OSError:
        return "unreadable"


def parse_split(text: str | tuple[float, ...] | None) -> tuple[float, float, float] | None:
    """Read ``"0.7,0.15,0.15"`` (or two numbers, train and test) into three fractions (``vocab.Fractions``)."""
    if text is None:
        return None
    check("scan_dataset", split=text)
    return Fractions().parse(text)


def scan_dataset(
    source: str | Path,
    *,
    split: str | tuple[float, ...] | None = None,
    seed: int = 0,
    split_from: str | Path | None = None,
    split_by: str = "shuffle",
    allow_outside_root: bool = False,
    verify_content: bool = False,
) -> ImageDataset:
    """Find the images under ``source`` (a folder or a CSV) and give every one a split.

    Split folders and CSV split columns are used as they are; otherwise a stratified
    split with ``split`` fractions (default 0.7/0.15/0.15) and ``seed`` is drawn: ``split_by``
    ``shuffle`` cuts each class's images, shuffled, at the fractions; ``path`` sends each image
    where a seeded hash of its class and relative path falls (``_hashed_split``), so adding images
    never moves one already there.
    ``split_from`` takes each image's split from a CSV (``path,split``) instead. A CSV's
    paths must resolve inside its folder unless ``allow_outside_root``. What the scan leaves
    out (dangling links, symlink loops, unreadable folders, folders without images) is listed
    in ``skipped``.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    check("scan_dataset", split_by=split_by)
    fractions = parse_split(split)
    skipped: list[tuple[str, str]] = []
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected a folder of images or a .csv file")
        root, classes, rows, origin = _read_csv(source, allow_outside_root, skipped)
        name = source.parent.name if source.stem in {"labels", "data", "index"} else source.stem
    else:
        root, name = source, source.resolve().name
        classes, rows, origin = _read_folders(source, skipped)
    if not rows:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")

    if split_from is not None:
        assigned = _read_split_csv(Path(split_from))
        missing = [r[0] for r in rows if r[0] not in assigned]
        if missing:
            raise DataError(f"{split_from}: no split given for {len(missing)} images, e.g. {missing[0]}")
        rows = [(p, label, assigned[p], g) for p, label, _, g in rows]
        origin = f"from {split_from}"
    elif fractions is not None or all(r[2] == "" for r in rows):
        if any(r[2] for r in rows) and fractions is not None:
            raise ConfigError(f"{source} already defines splits ({origin}); drop --split or use --split-from")
        fractions = fractions or DEFAULT_SPLIT
        rows = (_hashed_split if split_by == "path" else _assign_split)(rows, fractions, seed)
        origin = f"{'hashed' if split_by == 'path' else 'stratified'} {','.join(f'{f:g}' for f in fractions)} seed={seed}"
        if any(r[3] for r in rows):
            origin += " by group"

    samples = [Sample(path, label, split_name, group) for path, label, split_name, group in rows]
    return ImageDataset(root=root, name=name, classes=classes, samples=samples, split_source=origin,
                        skipped=skipped, verify_content=verify_content)


def _images_under(folder: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Image files under ``folder``, sorted; symlinked folders are followed once, hidden entries passed over.

    What cannot be read (a dangling link, a symlink loop, a folder without permission) goes into
    ``skipped`` with the reason, so a scan never drops anything without saying so.
    """
    found, seen = [], set()
    skipped = [] if skipped is None else skipped

    def walk(where: str) -> None:
        real = os.path.realpath(where)
        if real in seen:
            skipped.append((where, "symlink loop (a folder already scanned)"))
            return
        seen.add(real)
        try:
            entries = list(os.scandir(where))
        except OSError as err:
            skipped.append((os.fsdecode(err.filename or where), f"unreadable folder ({err.strerror})"))
            return
        folders = []
        for entry in entries:  # d_type answers is_dir/is_file for plain entries: no stat per image
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                made_by_featx = featx_output(Path(entry.path))
                if made_by_featx:
                    skipped.append((entry.path, made_by_featx))
                else:
                    folders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    found.append(entry.path)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    skipped.append((entry.path, "dangling symlink"))
            else:
                extension = os.path.splitext(entry.name)[1] or "no extension"
                skipped.append((entry.path, f"not an image file name ({extension})"))
        for sub in sorted(folders):
            walk(sub)

    walk(os.fspath(folder))
    return sorted(map(Path, found))  # as paths, part by part: the order rows (and fingerprints) always had


def featx_output(folder: Path) -> str:
    """Why ``folder`` is featx's own output and not images ('' when it is not): a run folder (``compare --out``)
    or a cache folder, whose plots and files must never become a class."""
    try:
        if (folder / RUN_MARKER).is_file():
            return f"a featx run folder ({RUN_MARKER}): not scanned"
        if any(p.name.endswith((".h5", ".h5.partial")) for p in folder.iterdir()):
            return "a featx cache folder (.h5 embedding files): not scanned"
    except OSError:
        return ""
    return ""


def list_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders as every image under them (sorted); a missing path is a usage error."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += _images_under(path)
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"no images in {', '.join(map(str, paths))}")
    return files


def carve_validation(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept for training and carved out for validation: stratified by label, seeded.

    Used wherever a validation split is missing (heads and fine-tuning alike), so both carve the same rows.
    """
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels)


def pseudo_labelled(dataset: ImageDataset, source: str | Path) -> list[Sample]:
    """Images of ``dataset`` outside its train and val splits, each labelled by a featx run's prediction, to train
    on: self-training on unlabelled target images (the test split, or images listed without a label).

    ``source`` is a CSV with ``path`` and ``predicted`` columns, as ``compare --out RUN`` writes in
    ``RUN/predictions/``. Its other columns (``truth`` there) are ignored and each image's own label is replaced,
    so no label of these images is read; train and val images are refused, so a pseudo-label neither overrides
    a given label nor enters validation.
    """
    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source}: no such file (pseudo-labels: a CSV with path and predicted columns)")
    by_path = {s.path: s for s in dataset.samples}
    index = {c: i for i, c in enumerate(dataset.classes)}
    found, first_line = [], {}
    for line, row in _read_table(source, {"path", "predicted"}):
        path, predicted = row["path"], row["predicted"]
        sample = by_path.get(path)
        if sample is None:
            raise DataError(f"{source}:{line}: {path} is not an image of {dataset.root}; list the images by their "
                            "path relative to the dataset's folder, as compare's predictions do")
        if sample.split in ("train", "val"):
            raise DataError(f"{source}:{line}: {path} is a {sample.split} image with a label of its own; "
                            "pseudo-labels are for the images outside train and val")
        if predicted not in index:
            raise DataError(f"{source}:{line}: unknown class {predicted!r}; the dataset's classes are "
                            f"{', '.join(dataset.classes)}")
        if path in first_line:
            raise DataError(f"{source}:{line}: {path} is listed again (first on line {first_line[path]})")
        first_line[path] = line
        found.append(replace(sample, label=index[predicted]))
    if not found:
        raise DataError(f"{source}: no pseudo-labelled images listed")
    return found


def _read_folders(root: Path, skipped: list[tuple[str, str]]):
    """Class folders, optionally inside train/val/test folders; which of the two, the top level alone says."""
    subdirs = []
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        made_by_featx = featx_output(d)
        if made_by_featx:
            skipped.append((str(d), made_by_featx))
        else:
            subdirs.append(d)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_FOLDER_NAMES]
    others = [d for d in subdirs if d not in split_dirs]
    named = {SPLIT_FOLDER_NAMES[d.name.lower()] for d in split_dirs}
    # A lone train/ beside folders of images is a class called "train", not a split layout.
    if "train" in named and (len(named) > 1 or not any(_images_under(d, []) for d in others)):
        skipped += [(str(d), "not a train, val or test folder: left out of the split layout") for d in others]
        skipped += [(str(p), "an image outside the train, val and test folders: left out")
                    for d in [root, *split_dirs] for p in sorted(d.iterdir())
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        class_names = sorted(
            {c.name for d in split_dirs for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")}
        )
        index = {c: i for i, c in enumerate(class_names)}
        rows = []
        for d in sorted(split_dirs, key=lambda d: SPLITS.index(SPLIT_FOLDER_NAMES[d.name.lower()])):
            split_name = SPLIT_FOLDER_NAMES[d.name.lower()]
            for c in class_names:
                if not (d / c).is_dir():
                    continue
                images = _images_under(d / c, skipped)
                if not images:
                    raise DataError(f"{d / c}: empty class folder (no images); add images or remove the folder")
                rows += [(p.relative_to(root).as_posix(), index[c], split_name, "") for p in images]
        return class_names, rows, "split folders"
    images_of = {d: _images_under(d, skipped) for d in subdirs}
    skipped += [(str(d), "no images in this folder: not a class") for d, images in images_of.items() if not images]
    class_dirs = [d for d in subdirs if images_of[d]]
    if not class_dirs:
        raise DataError(f"{root}: expected one folder per class (or train/ val/ test/ folders of class folders)")
    class_names = [d.name for d in class_dirs]
    rows = [(p.relative_to(root).as_posix(), i, "", "") for i, d in enumerate(class_dirs) for p in images_of[d]]
    return class_names, rows, "none"


def _read_table(path: Path, required: set[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with lower-case keys) of a UTF-8 CSV whose header names ``required``; one-line errors."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            if not required <= set(header):
                raise DataError(f"{path}: the header must name the columns {', '.join(sorted(required))}; "
                                f"found {header}")
            rows = [(reader.line_num, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k})
                    for row in reader]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        "save the CSV as UTF-8") from None
    except csv.Error as err:  # an unterminated quote, a field over the size limit
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    for line, row in rows:
        if any("\0" in value for value in row.values()):  # a path with NUL cannot name a file anywhere
            raise DataError(f"{path}:{line}: NUL byte in the row")
    return rows


def _read_csv(path: Path, allow_outside_root: bool, skipped: list[tuple[str, str]]):
    """A CSV of ``path,label[,split[,group]]``; paths are relative to the CSV's folder and must stay inside it.
    The header line repeated (files concatenated) is passed over and listed, never read as a class."""
    root = path.parent
    inside = root.resolve()
    records = []
    for line, r in _read_table(path, {"path", "label"}):
        if r["path"].lower() == "path" and r["label"].lower() == "label":
            skipped.append((f"{path}:{line}", "the header line again: not an image"))
        else:
            records.append((line, r))
    classes = sorted({r["label"] for _, r in records if r["label"]})
    index = {c: i for i, c in enumerate(classes)}
    rows, first_line = [], {}
    for line, r in records:
        split_name = SPLIT_FOLDER_NAMES.get(r.get("split", "").lower(), None)
        if split_name is None and r.get("split"):
            raise DataError(f"{path}:{line}: unknown split {r['split']!r}; use train, val or test")
        if not r["path"]:
            raise DataError(f"{path}:{line}: empty path")
        if is_url(r["path"]):  # read through fsspec, where it is: not a path under the root
            require_fsspec()
            where = r["path"]
        else:
            file_path = Path(r["path"])
            resolved = (root / file_path).resolve()
            if not allow_outside_root and not resolved.is_relative_to(inside):
                raise DataError(f"{path}:{line}: {file_path} resolves outside the CSV's folder {inside}; move it "
                                "inside or pass --allow-outside-root")
            where = (resolved.relative_to(inside) if resolved.is_relative_to(inside) else file_path).as_posix()
        if where in first_line:
            raise DataError(f"{path}:{line}: {where} is listed again (first on line {first_line[where]}); list each "
                            "image once")
        first_line[where] = line
        rows.append((where, index.get(r["label"], -1), split_name or "", r.get("group", "")))
    has_split = any(r[2] for r in rows)
    if has_split and not all(r[2] for r in rows):
        raise DataError(f"{path}: the split column is empty on some rows; fill it on every row or on none")
    return root, classes, rows, "csv split column" if has_split else "none"


def _read_split_csv(path: Path) -> dict[str, str]:
    if not path.is_file() or path.suffix.lower() != ".csv":
        raise DataError(f"{path}: --split-from expects a CSV with 'path' and 'split' columns")
    out = {}
    for line, row in _read_table(path, {"path", "split"}):
        if row["split"].lower() not in SPLIT_FOLDER_NAMES:
            raise DataError(f"{path}:{line}: unknown split {row['split']!r} for {row['path']}; use train, val or test")
        out[Path(row["path"]).as_posix()] = SPLIT_FOLDER_NAMES[row["split"].lower()]
    return out


def _hashed_split(rows, fractions, seed):
    """Each image (each group, where groups exist) in the split where a seeded hash of its class and relative path
    (group) falls between the cumulative fractions: one image's split never depends on the others, so images added
    later never move one already split, on any machine. The price: per class, each split's share varies as a
    binomial sample of the fractions (at 500 images, about ±1.6 points for a 15 % split) instead of being exact."""
    bounds = np.cumsum(fractions)[:2]
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, (path, _, _, group) in enumerate(rows):
        by_group[group or f"\0{path}"].append(i)
    split_of = {}
    for key, members in by_group.items():
        label = Counter(rows[i][1] for i in members).most_common(1)[0][0]
        digest = hashlib.sha256(f"{seed}\0{label}\0{key}".encode("utf-8", "surrogateescape")).digest()
        place = int.from_bytes(digest[:8], "big") / 2 ** 64
        name = "train" if place < bounds[0] else "val" if place < bounds[1] else "test"
        split_of.update((i, name) for i in members)
    return [(path, label, split_of[i], group) for i, (path, label, _, group) in enumerate(rows)]


def _assign_split(rows, fractions, seed):
    """Stratified split: within each class, shuffle (by group when groups exist) and cut by fractions."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, (path, _, _, group) in enumerate(rows):
        by_group[group or f"\0{path}"].append(i)
    # A group goes to the split of its most common label, so a patient never straddles splits.
    by_label: dict[int, list[str]] = defaultdict(list)
    for group, members in sorted(by_group.items()):
        label = Counter(rows[i][1] for i in members).most_common(1)[0][0]
        by_label[label].append(group)
    split_of: dict[int, str] = {}
    for label in sorted(by_label):
        groups = by_label[label]
        order = rng.permutation(len(groups))
        total = sum(len(by_group[g]) for g in groups)
        bounds = np.cumsum(fractions)[:2] * total
        seen = 0
        for k in order:
            members = by_group[groups[k]]
            middle = seen + len(members) / 2
            name = "train" if middle < bounds[0] else "val" if middle < bounds[1] else "test"
            for i in members:
                split_of[i] = name
            seen += len(members)
    return [(p, label, split_of[i], g) for i, (p, label, _, g) in enumerate(rows)]
