"""Files beside a recipe are importable by `class_path` (docs/your_data.md). These two turn
scikit-learn's bundled data into what a user usually has, then read it with the registered builders:
a CSV table (`wine_table`) and a folder of images in ImageFolder layout (`digit_images`). Each
writes its folder once under `root` and reuses it."""

from __future__ import annotations

import os
from pathlib import Path

from distill.data.sources import image_folder, table


def _publish(tmp: Path, final: Path) -> None:
    """Moves a finished folder into place (a concurrent writer that won keeps its copy)."""
    try:
        os.replace(tmp, final)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def wine_table(root: str = "data/wine", seed: int = 0):
    """The UCI wine table (178 rows, 13 measurements, 3 cultivars) as `root/wine.csv`."""
    from sklearn.datasets import load_wine

    path = Path(root) / "wine.csv"
    if not path.exists():
        wine = load_wine()
        lines = [",".join([*wine.feature_names, "cultivar"])]
        lines += [
            ",".join(f"{v:g}" for v in row) + f",{wine.target_names[t]}"
            for row, t in zip(wine.data, wine.target)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".wine.csv.tmp-{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    return table(str(path), label="cultivar", seed=seed)


def digit_images(root: str = "data/digit_images", image_size: int = 32, seed: int = 0):
    """scikit-learn's 1,797 handwritten digits as PNG files, `root/<digit>/<n>.png`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(root)
    if not folder.exists():
        x, y = load_digits(return_X_y=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        for i, (img, label) in enumerate(zip(x, y)):
            (tmp / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((img.reshape(8, 8) * 255 / 16).astype(np.uint8)).save(
                tmp / str(label) / f"{i}.png"
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        _publish(tmp, folder)
    return image_folder(str(folder), image_size=image_size, augment=False, normalize=False, seed=seed)
