"""CIFAR-100 loader errors and the generated stand-in."""

from __future__ import annotations

import pytest
import torch

from distill.data.cifar import CifarStandIn, cifar100, crop_flip
from distill.errors import DistillError


def test_missing_cifar_names_the_expected_folder(tmp_path):
    with pytest.raises(DistillError, match=str(tmp_path / "cifar-100-python")):
        cifar100(tmp_path)


def test_standin_shapes_determinism_and_split():
    a, b = CifarStandIn(n=16, seed=3), CifarStandIn(n=16, seed=3, augment=False)
    x, y = b[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 100
    torch.testing.assert_close(a.images, b.images)
    test = CifarStandIn(n=16, seed=3, train=False)
    assert not torch.equal(test.images, b.images)
    assert not test.augment


def test_crop_flip_keeps_shape_and_content():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    out = crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every non-padded value comes from x.
    vals = set(out[out != 0].tolist())
    assert vals <= set(x.flatten().tolist())
