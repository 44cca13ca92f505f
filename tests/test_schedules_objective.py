import pytest
import torch

from distill import (
    KD,
    ConfigError,
    Constant,
    Cosine,
    CrossEntropy,
    Linear,
    Objective,
    Outputs,
    Progress,
    Step,
    Warmup,
)
from distill.outputs import Batch
from distill.schedules import as_schedule


def at(f):
    return Progress(step=int(f * 100), total_steps=100)


def test_schedule_values():
    assert Constant(3)(at(0.5)) == 3
    w = Warmup(1.0, warmup=0.2)
    assert w(at(0)) == 0 and w(at(0.1)) == pytest.approx(0.5) and w(at(0.5)) == 1
    lin = Linear(8, 2)
    assert lin(at(0)) == 8 and lin(at(0.5)) == pytest.approx(5) and lin(at(1)) == 2
    cos = Cosine(8, 2)
    assert (
        cos(at(0)) == pytest.approx(8) and cos(at(0.5)) == pytest.approx(5) and cos(at(1)) == pytest.approx(2)
    )
    st = Step([8, 4, 2], [0.3, 0.6])
    assert [st(at(f)) for f in (0, 0.3, 0.59, 0.6, 1)] == [8, 4, 4, 2, 2]


def test_schedule_validation():
    with pytest.raises(ConfigError, match="fraction"):
        Warmup(1, warmup=2)
    with pytest.raises(ConfigError, match="milestones"):
        Step([1, 2], [])
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'.*cosine"):
        as_schedule({"name": "cosin", "start": 1, "end": 0})
    assert isinstance(as_schedule({"name": "linear", "start": 1, "end": 0}), Linear)


def test_objective_weights_schedules_and_terms():
    obj = Objective(
        {"ce": CrossEntropy(), "kd": KD(temperature=4)},
        weights={"ce": 0.25, "kd": Warmup(1.0, warmup=0.5)},
        schedules={"kd.temperature": Linear(8, 2)},
    )
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    batch = Batch(inputs=None, targets=torch.tensor([0, 1, 2, 0]))
    obj.update(at(0))
    out = obj(Outputs(s), Outputs(t), batch)
    assert "kd" not in out  # weight 0 at the start: not computed
    assert out["loss"].item() == pytest.approx(0.25 * out["ce"].item())
    vals = obj.update(at(0.5))
    assert vals["kd.temperature"] == pytest.approx(5) and obj.terms["kd"].temperature == pytest.approx(5)
    out = obj(Outputs(s), Outputs(t), batch)
    assert out["loss"].item() == pytest.approx(0.25 * out["ce"].item() + 1.0 * out["kd"].item(), rel=1e-6)


def test_objective_config_errors():
    with pytest.raises(ConfigError, match="no terms"):
        Objective({})
    with pytest.raises(ConfigError, match="unknown term 'kd'"):
        Objective({"ce": CrossEntropy()}, weights={"kd": 1})
    with pytest.raises(ConfigError, match="no numeric attribute 'temp'"):
        Objective({"kd": KD()}, schedules={"kd.temp": 1})
    assert Objective({"kd": KD()}).needs_teacher and not Objective({"ce": CrossEntropy()}).needs_teacher
