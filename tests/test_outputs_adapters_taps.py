import pytest
import torch
from torch import nn

from distill import Batch, DistillError, FeatureTap, Outputs, Teacher, as_batch, read_outputs


def test_as_batch_forms():
    x, y, i = torch.randn(4, 3), torch.arange(4), torch.arange(4) + 10
    b = as_batch((x, y))
    assert b.inputs is x and b.targets is y and b.index is None and b.size == 4
    b = as_batch((x, y, i))
    assert b.index is i
    b = as_batch({"input_ids": x, "attention_mask": x, "labels": y, "idx": i})
    assert set(b.inputs) == {"input_ids", "attention_mask"} and b.targets is y and b.index is i
    assert as_batch(x).targets is None
    b = as_batch({"image": x, "label": y})
    assert b.inputs is x and b.targets is y


def test_as_batch_rejects_unknown_shape():
    with pytest.raises(DistillError, match="not understood"):
        as_batch((1, 2, 3, 4))


def test_batch_to_moves_tensors_and_dicts():
    b = as_batch({"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)}).to("cpu")
    assert b.inputs["input_ids"].device.type == "cpu"


def test_read_outputs():
    t = torch.randn(2, 5)
    assert read_outputs(t).logits is t
    o = read_outputs({"logits": t, "hidden_states": (t,)})
    assert o.logits is t and o.extras["hidden_states"] == (t,)
    o = read_outputs((t, "aux"))
    assert o.logits is t and o.extras["rest"] == ("aux",)
    with pytest.raises(DistillError, match="cannot read"):
        read_outputs(42)


def test_outputs_feature_error_names_tapped():
    o = Outputs(logits=torch.zeros(1, 2), features={"layer1": torch.zeros(1)})
    with pytest.raises(DistillError, match=r"no tapped feature 'layer2'.*layer1"):
        o.feature("layer2", "student")


def _net():
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3)
    )


def test_feature_tap_captures_by_path():
    m = _net()
    tap = FeatureTap(m, ["1", "2.0"])
    m(torch.randn(5, 4))
    feats = tap.collect()
    assert feats["1"].shape == (5, 8) and feats["2.0"].shape == (5, 8)
    assert tap.collect() == {}
    tap.remove()
    m(torch.randn(5, 4))
    assert tap.collect() == {}


def test_feature_tap_bad_path_lists_near_matches():
    with pytest.raises(DistillError, match=r"no module '2\.O'.*nearest: .*2\.0"):
        FeatureTap(_net(), ["2.O"])


def test_teacher_is_frozen_and_outputs_work_in_autograd():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    m.train()
    stats = m[1].running_mean.clone()
    teacher = Teacher(m, taps=["1"])
    out = teacher(Batch(inputs=torch.randn(6, 4)))
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    assert torch.equal(m[1].running_mean, stats)  # eval mode: BN statistics untouched
    assert out.features["1"].shape == (6, 4)
    s = torch.randn(6, 3, requires_grad=True)
    ((s - out.logits) ** 2).sum().backward()  # teacher tensors usable as constants
    assert s.grad is not None


def test_teacher_bf16_returns_float32():
    teacher = Teacher(nn.Linear(4, 3), dtype=torch.bfloat16)
    out = teacher(Batch(inputs=torch.randn(2, 4)))
    assert out.logits.dtype == torch.float32
