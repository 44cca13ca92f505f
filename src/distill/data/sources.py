"""Data a user already has, with no code: a folder of images, a table of features, any
`torchvision.datasets` class on a local root. Each is a registered data builder (`image_folder`,
`table`, `torchvision`); nothing is ever downloaded.

When the source has no validation or test split of its own, one is taken from the training data,
stratified by class and fixed by `split_seed` (not by the run's seed, so seeds compare training only).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from distill.data.bundle import DataBundle
from distill.errors import DistillError

# ImageNet's per-channel statistics: what pretrained torchvision and timm models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Splits indices into `len(fractions) + 1` parts: the first keeps the rest, part k+1 takes
    `fractions[k]` of every class (rounded, at least one sample when the class has more than one
    per part, so a small class still reaches every split). Fixed by `seed`."""
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise DistillError(f"split fractions {list(fractions)} must each be in [0, 1) and sum below 1")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    g = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for y in sorted(by_class):
        idx = by_class[y]
        order = [idx[int(j)] for j in torch.randperm(len(idx), generator=g)]
        start = 0
        for k, f in enumerate(fractions, start=1):
            n = round(f * len(order))
            if f > 0 and n == 0 and len(order) > len(fractions):
                n = 1
            parts[k].extend(order[start : start + n])
            start += n
        parts[0].extend(order[start:])
    return [sorted(p) for p in parts]


# --------------------------------------------------------------------------- image folder


def image_transforms(image_size: int, augment: bool, normalize: bool):
    """torchvision transforms: training gets a random resized crop (80-100% of the image) and a
    horizontal flip; evaluation resizes the short side to 8/7 of `image_size` and crops the centre
    (the usual 256 -> 224). Normalised with ImageNet's statistics, as pretrained models expect."""
    from torchvision import transforms as T

    tail = [T.ToTensor()] + ([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else [])
    if augment:
        train = [T.RandomResizedCrop(image_size, scale=(0.8, 1.0)), T.RandomHorizontalFlip()]
    else:
        train = [T.Resize(image_size), T.CenterCrop(image_size)]
    evaluation = [T.Resize(math.ceil(image_size * 8 / 7)), T.CenterCrop(image_size)]
    return T.Compose(train + tail), T.Compose(evaluation + tail)


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


def _where(path: Path) -> str:
    """For a relative path that is not there: where it was looked for (a run folder's config.yaml
    replayed from another directory)."""
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"


def _load_image(path: str):
    """One RGB image; a file that cannot be decoded is named (the loop would name only its index)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError (OSError), truncated
        raise DistillError(f"image {path} cannot be read ({e}); replace or remove the file") from None


def image_folder(
    root: str,
    image_size: int = 224,
    augment: bool = True,
    normalize: bool = True,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    seed: int = 0,
) -> DataBundle:
    """Images in torchvision's `ImageFolder` layout: `root/<class>/<image>` (one folder per class),
    or `root/train/<class>/...` with optional `val/` (or `valid/`, `validation/`) and `test/` beside it.

    Args:
        root: the folder.
        image_size: the side of the square crop models see.
        augment: random resized crop + flip on the training split (evaluation splits never).
        normalize: ImageNet mean/std (what pretrained models expect).
        val_fraction, test_fraction: shares of the training images held out, per class, for a split
            the folder does not have.
        split_seed: fixes which images are held out.
        seed: the run's seed (unused: the split stays put across seeds).
    """
    try:
        from torchvision.datasets import ImageFolder
    except ImportError as e:
        raise DistillError("image_folder needs torchvision: pip install 'distill[vision]'") from e
    base = Path(root)
    if not base.is_dir():
        raise DistillError(
            f"image_folder: {base}{_where(base)} is not a folder; set data.init_args.root to your images"
        )
    folders = _split_folders(base)
    train_root = folders.get("train", base)
    if set(folders) - {"train"} and "train" not in folders:
        raise DistillError(f"image_folder: {base} has {'/'.join(sorted(folders))}/ but no train/ folder")
    train_tf, eval_tf = image_transforms(image_size, augment, normalize)

    def load(folder: Path, transform) -> Any:
        try:
            return ImageFolder(str(folder), transform=transform, loader=_load_image)
        except (FileNotFoundError, RuntimeError) as e:
            first = str(e).splitlines()[0]
            raise DistillError(
                f"image_folder: {folder} is not in ImageFolder layout ({first}); "
                "expected one sub-folder of images per class"
            ) from None

    train_aug, train_plain = load(train_root, train_tf), load(train_root, eval_tf)
    held = [val_fraction if "val" not in folders else 0.0, test_fraction if "test" not in folders else 0.0]
    keep, val_idx, test_idx = stratified_split(train_aug.targets, held, split_seed)
    splits: dict[str, Dataset | None] = {"train": Subset(train_aug, keep) if any(held) else train_aug}
    for name, idx in (("val", val_idx), ("test", test_idx)):
        if name in folders:
            ds = load(folders[name], eval_tf)
            if ds.classes != train_aug.classes:
                raise DistillError(
                    f"image_folder: {folders[name]} has classes {ds.classes[:5]}..., not those of "
                    f"{train_root} ({train_aug.classes[:5]}...)"
                )
            splits[name] = ds
        else:
            splits[name] = Subset(train_plain, idx) if idx else None
    meta = {
        "source": str(base),
        "classes": list(train_aug.classes),
        "split_from": "folders" if set(folders) >= {"val", "test"} else f"split_seed={split_seed}",
        **{f"n_{k}": len(v) for k, v in splits.items() if v is not None},
    }
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(train_aug.classes),
        input_shape=(3, image_size, image_size),
        meta=meta,
    )


# --------------------------------------------------------------------------- tables


def _read_table(path: Path) -> dict[str, list[Any]]:
    """Columns of a CSV (header row; values parsed as numbers where they are) or Parquet file.

    Both are read with pyarrow (the `tables` extra): its CSV reader works in blocks, so a file that
    is not a table (a huge field, binary data) fails at once, with the row, instead of being read
    whole into memory first."""
    if not path.is_file():
        raise DistillError(
            f"table: {path}{_where(path)} does not exist; set data.init_args.path to your CSV or Parquet file"
        )
    try:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DistillError(f"table: reading {path} needs pyarrow: pip install 'distill[tables]'") from e
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            t = pq.read_table(path)
        else:
            # one thread: the reader then numbers the row it stopped at
            t = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(use_threads=False),
                convert_options=pcsv.ConvertOptions(null_values=[""]),  # "NA", "nan" stay what they say
            )
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DistillError(
            f"table: {path} cannot be read as a CSV/Parquet table with a header row ({_row_words(first)})"
        ) from None
    names = [n.strip() for n in t.column_names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DistillError(f"table: {path} has the column '{twice[0]}' twice; give each column its own name")
    if t.num_rows < 1:
        raise DistillError(f"table: {path} needs a header row and at least one data row")
    cols: dict[str, list[Any]] = {}
    for name, col in zip(names, t.columns, strict=True):
        values = col.to_pylist()
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = [None if v is None else _number(v.strip()) for v in values]
        cols[name] = values
    return cols


def _row_words(msg: str) -> str:
    """pyarrow's `CSV parse error: Row #3: ...` as `line 3: ...` (it counts the header as row 1)."""
    return msg.replace("CSV parse error: Row #", "line ").replace("CSV parse error: ", "")


def _number(v: str) -> Any:
    try:
        return float(v) if v != "" else None
    except ValueError:
        return v


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _features(cols: dict[str, list[Any]], names: list[str], source: str) -> torch.Tensor:
    # every split is checked before standardising: one inf would spread to the whole column
    for name in names:
        for row, v in enumerate(cols[name]):
            if v is None or not isinstance(v, int | float) or isinstance(v, bool):
                what = "nothing" if v is None else repr(v)
                raise DistillError(
                    f"table: {source} column '{name}' row {row + 1} holds {what}, not a number; "
                    "fill it, or leave the column out with data.init_args.features"
                )
            if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
                raise DistillError(
                    f"table: {source} column '{name}' row {row + 1} holds {v}, not a finite number; "
                    "fix the value (a number too large for float32 reads as inf), or leave the column out "
                    "with data.init_args.features"
                )
    return torch.tensor([cols[n] for n in names], dtype=torch.float32).T.contiguous()  # (N, F)


def _labels(values: list[Any], source: str, label: str) -> tuple[torch.Tensor, list[str]]:
    if any(v is None for v in values):
        raise DistillError(f"table: {source} column '{label}' has empty cells")
    classes = sorted({str(_as_class(v)) for v in values}, key=_class_order)
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(_as_class(v))] for v in values]), classes


def _as_class(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _class_order(c: str) -> tuple[int, float, str]:
    try:
        return (0, float(c), c)  # numeric labels in numeric order: 2 before 10
    except ValueError:
        return (1, 0.0, c)


def table(
    path: str,
    label: str = "label",
    features: list[str] | None = None,
    val_path: str | None = None,
    test_path: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    standardize: bool = True,
    split_seed: int = 0,
    seed: int = 0,
) -> DataBundle:
    """A CSV or Parquet table: one row per sample, numeric feature columns and a label column.

    Args:
        path: the training table (`.csv` with a header row, or `.parquet`).
        label: the label column; its values (numbers or names) become classes 0..K-1 in sorted order
            (`meta["classes"]` keeps the names).
        features: the feature columns (default: every column but the label).
        val_path, test_path: separate tables for those splits (same columns); a missing one is
            taken from `path`, `val_fraction` / `test_fraction` of each class, fixed by `split_seed`.
        standardize: scale each feature to zero mean and unit variance with the training split's
            statistics (kept in `meta["mean"]` / `meta["std"]`).
        seed: the run's seed (unused: the split stays put across seeds).
    """
    source = Path(path)
    cols = _read_table(source)
    if label not in cols:
        raise DistillError(
            f"table: {source} has no label column '{label}'; its columns are {', '.join(cols)}; "
            "set data.init_args.label to the one holding the classes"
        )
    names = list(features) if features is not None else [c for c in cols if c != label]
    unknown = [n for n in names if n not in cols]
    if unknown:
        raise DistillError(f"table: {source} has no column {unknown[0]!r}; its columns are {', '.join(cols)}")
    if not names:
        raise DistillError(f"table: {source} has no feature column besides '{label}'")
    x, (y, classes) = _features(cols, names, str(source)), _labels(cols[label], str(source), label)

    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    held = [0.0 if val_path else val_fraction, 0.0 if test_path else test_fraction]
    keep, val_idx, test_idx = stratified_split(y.tolist(), held, split_seed)
    parts["train"] = (x[keep], y[keep])
    for name, other, idx in (("val", val_path, val_idx), ("test", test_path, test_idx)):
        if other:
            oc = _read_table(Path(other))
            missing = [c for c in [*names, label] if c not in oc]
            if missing:
                raise DistillError(f"table: {other} lacks column {missing[0]!r} that {source} has")
            oy = [str(_as_class(v)) for v in oc[label]]
            strange = sorted(set(oy) - set(classes))
            if strange:
                raise DistillError(f"table: {other} has label {strange[0]!r}, absent from {source}")
            parts[name] = (_features(oc, names, other), torch.tensor([classes.index(v) for v in oy]))
        elif idx:
            parts[name] = (x[idx], y[idx])
    meta: dict[str, Any] = {"source": str(source), "features": names, "label": label, "classes": classes}
    if standardize:
        mean, std = parts["train"][0].mean(0), parts["train"][0].std(0).clamp_min(1e-8)
        parts = {k: ((v[0] - mean) / std, v[1]) for k, v in parts.items()}
        meta.update(mean=mean.tolist(), std=std.tolist())
    meta.update({f"n_{k}": len(v[1]) for k, v in parts.items()})
    built = {k: TensorDataset(*v) for k, v in parts.items()}
    return DataBundle(
        train=built["train"],
        val=built.get("val"),
        test=built.get("test"),
        num_classes=len(classes),
        input_shape=(len(names),),
        meta=meta,
    )


# --------------------------------------------------------------------------- torchvision.datasets


def torchvision_dataset(
    dataset: str,
    root: str,
    image_size: int | None = None,
    augment: bool = False,
    normalize: bool = False,
    init_args: dict[str, Any] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    seed: int = 0,
) -> DataBundle:
    """Any `torchvision.datasets` class by name (`MNIST`, `CIFAR10`, `Flowers102`, ...) read from a
    local `root`; `download=False` always.

    The splits come from the class: a `split` argument (train / val / test where it has them) or a
    `train` flag (train, test); a split it lacks is taken from the training data (per class when
    the class exposes `targets`), fixed by `split_seed`.

    Args:
        dataset: the class name in `torchvision.datasets`.
        root: the folder holding the files as the class expects them.
        image_size: resize (shorter side) and centre-crop to this; default: the images as stored.
        augment: random horizontal flip on the training split.
        normalize: ImageNet mean/std (for pretrained models; needs 3 channels).
        init_args: extra keyword arguments for the class.
        seed: the run's seed (unused).
    """
    try:
        import torchvision.datasets as tvd
        from torchvision import transforms as T
    except ImportError as e:
        raise DistillError("torchvision datasets need torchvision: pip install 'distill[vision]'") from e
    cls = getattr(tvd, dataset, None)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        near = [n for n in dir(tvd) if n.lower() == dataset.lower()]
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise DistillError(f"torchvision has no dataset class '{dataset}'{hint}")
    if not Path(root).is_dir():
        raise DistillError(
            f"torchvision {dataset}: root {root} does not exist; nothing is downloaded, so put the "
            f"files there first (as {dataset}(root, download=True) would) and set data.init_args.root"
        )
    params = inspect.signature(cls).parameters
    base = [T.Resize(image_size), T.CenterCrop(image_size)] if image_size else []
    tail = [T.ToTensor()] + ([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else [])
    train_tf = T.Compose(base + ([T.RandomHorizontalFlip()] if augment else []) + tail)
    eval_tf = T.Compose(base + tail)
    extra = dict(init_args or {})
    if "download" in params:
        extra["download"] = False

    def load(split: str | None, transform) -> Any:
        kw = dict(extra)
        if split is not None and "split" in params:
            kw["split"] = split
        elif split is not None and "train" in params:
            kw["train"] = split == "train"
        try:
            return cls(root, transform=transform, **kw)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DistillError(
                f"torchvision {dataset}: cannot read it from {root} ({first}); nothing is downloaded: "
                f"put the files where {dataset} expects them under root"
            ) from None
        except ValueError:
            return None  # a split name this class does not know

    if "split" in params:
        names = {"train": "train", "val": "val", "test": "test"}
    elif "train" in params:
        names = {"train": "train", "val": None, "test": "test"}
    else:
        names = {"train": None, "val": None, "test": None}
    train = load(names["train"], train_tf)
    if train is None:
        raise DistillError(f"torchvision {dataset}: it has no 'train' split")
    found = {k: load(v, eval_tf) for k, v in names.items() if k != "train" and v}
    found = {k: v for k, v in found.items() if v is not None}
    held = [0.0 if "val" in found else val_fraction, 0.0 if "test" in found else test_fraction]
    if any(held):
        plain = load(names["train"], eval_tf)
        labels = _targets(train)
        if labels is None:  # no labels to stratify by: a seeded random split
            labels = [0] * len(train)
        keep, val_idx, test_idx = stratified_split(labels, held, split_seed)
        for k, idx in (("val", val_idx), ("test", test_idx)):
            if k not in found and idx:
                found[k] = Subset(plain, idx)
        train = Subset(train, keep)
    x0, _ = train[0]
    num_classes = _num_classes(train)
    return DataBundle(
        train=train,
        val=found.get("val"),
        test=found.get("test"),
        num_classes=num_classes,
        input_shape=tuple(x0.shape),
        meta={"source": f"torchvision.datasets.{dataset}({root})", "n_train": len(train)},
    )


def _targets(ds: Any) -> list[int] | None:
    for attr in ("targets", "labels", "_labels", "y"):
        t = getattr(ds, attr, None)
        if t is not None:
            return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]
    return None


def _num_classes(ds: Any) -> int | None:
    inner = ds.dataset if isinstance(ds, Subset) else ds
    classes = getattr(inner, "classes", None)
    if classes:
        return len(classes)
    labels = _targets(inner)
    return max(labels) + 1 if labels else None
