import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.losses.logits import kd_loss
from distill.objective import Objective
from distill.outputs import Batch, Outputs
from distill.teachers import Teacher
from distill.teachers.ensemble import Ensemble, EnsembleKD, combine, member_weights


def _models(seed=0, k=3):
    torch.manual_seed(seed)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    return [conv, mlp, lin][:k]


def _batch(b=6):
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g))


def test_confidence_weights_match_hand_formula():
    z = torch.randn(3, 4, 5)
    y = torch.tensor([0, 1, 2, 3])
    tau = 0.7
    w = member_weights(z, "confidence", y, tau)
    for b in range(4):
        ce = [
            -math.log(math.exp(z[k, b, y[b]]) / sum(math.exp(v) for v in z[k, b].tolist())) for k in range(3)
        ]
        e = [math.exp(-c / tau) for c in ce]
        for k in range(3):
            assert w[b, k].item() == pytest.approx(e[k] / sum(e), rel=1e-5)


def test_entropy_weights_match_hand_formula_and_prefer_certain_teacher():
    z = torch.stack([torch.tensor([[10.0, 0, 0]]), torch.tensor([[0.1, 0, 0]])])  # (2, 1, 3)
    w = member_weights(z, "entropy", None, 1.0)
    h = []
    for k in range(2):
        p = [math.exp(v) for v in z[k, 0].tolist()]
        p = [v / sum(p) for v in p]
        h.append(-sum(v * math.log(v) for v in p))
    e = [math.exp(-v) for v in h]
    assert w[0, 0].item() == pytest.approx(e[0] / sum(e), rel=1e-5)
    assert w[0, 0] > w[0, 1]


def test_combine_probs_is_log_of_weighted_mean_probability():
    z = torch.randn(3, 4, 5)
    w = torch.softmax(torch.randn(4, 3), -1)
    mix = combine(z, w, "probs")
    expected = sum(w[:, k : k + 1] * F.softmax(z[k], -1) for k in range(3)).log()
    torch.testing.assert_close(mix, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.softmax(mix, -1).sum(-1), torch.ones(4))
    torch.testing.assert_close(combine(z, w, "logits"), sum(w[:, k : k + 1] * z[k] for k in range(3)))


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs", "confidence", "entropy", "learned"])
def test_ensemble_of_identical_teachers_equals_single_teacher(rule):
    m = _models()[1]
    batch = _batch()
    single = Teacher(m)(batch).logits
    ens = Ensemble([m, m, m], rule=rule)(batch)
    if rule == "mean_probs":  # log-probabilities: the same distribution, shifted logits
        torch.testing.assert_close(ens.logits, F.log_softmax(single, -1), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(ens.logits, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ens.extras["member_weights"], torch.full((6, 3), 1 / 3))


def test_ensemble_mean_rules_against_plain_formulas():
    models = _models()
    batch = _batch()
    zs = [m(batch.inputs).detach() for m in models]
    ml = Ensemble(models, rule="mean_logits")(batch).logits
    torch.testing.assert_close(ml, sum(zs) / 3, rtol=1e-5, atol=1e-6)
    mp = Ensemble(models, rule="mean_probs")(batch).logits
    torch.testing.assert_close(mp.exp(), sum(F.softmax(z, -1) for z in zs) / 3, rtol=1e-5, atol=1e-6)
    conf = Ensemble(models, rule="confidence", tau=2.0, space="probs")(batch)
    w = torch.softmax(
        -torch.stack([F.cross_entropy(z, batch.targets, reduction="none") for z in zs], 1) / 2, 1
    )
    torch.testing.assert_close(conf.extras["member_weights"], w)
    torch.testing.assert_close(
        conf.logits.exp(), sum(w[:, k : k + 1] * F.softmax(zs[k], -1) for k in range(3))
    )


def test_ensemble_features_are_prefixed_per_member_and_bad_paths_refused():
    models = _models()
    ens = Ensemble(models)
    ens.add_taps(["t0.0", "t1.1", "t2.1"])
    out = ens(_batch())
    assert set(out.features) == {"t0.0", "t1.1", "t2.1"}
    assert out.features["t0.0"].shape == (6, 4, 8, 8)
    assert out.features["t1.1"].shape == (6, 16)
    assert out.extras["members"].shape == (3, 6, 5)
    with pytest.raises(DistillError, match="t<i>"):
        ens.add_taps(["1"])
    with pytest.raises(DistillError, match="no module"):
        ens.add_taps(["t1.nope"])


def test_ensemble_rejects_mismatched_classes_and_unknown_rule():
    with pytest.raises(DistillError, match="same number of classes"):
        Ensemble([nn.Flatten(), nn.Sequential(nn.Flatten(), nn.Linear(64, 5))])(_batch())
    with pytest.raises(DistillError, match="not one of"):
        Ensemble(_models(), rule="vote")
    with pytest.raises(DistillError, match="needs labels"):
        Ensemble(_models(), rule="confidence")(Batch(torch.randn(2, 1, 8, 8)))


def test_ensemble_kd_gate_is_trainable_starts_uniform_and_learns_the_right_teacher():
    # Teacher 0 is always right, teacher 1 always wrong: the gate should learn to trust teacher 0.
    torch.manual_seed(0)
    n, c = 64, 4
    y = torch.randint(0, c, (n,))
    good = F.one_hot(y, c).float() * 4
    bad = F.one_hot((y + 1) % c, c).float() * 4
    teacher = Outputs(logits=None, extras={"members": torch.stack([good, bad])})
    student = Outputs(logits=torch.zeros(n, c, requires_grad=True))
    batch = Batch(torch.zeros(n, 1), y)
    term = EnsembleKD(temperature=2.0)
    obj = Objective({"ens": term})
    obj.setup(student, teacher, batch)
    w0 = term.weights(teacher)
    torch.testing.assert_close(w0, torch.full((n, 2), 0.5))
    # At uniform gate weights the KD part equals kd_loss against the mean of logits.
    mix = (good + bad) / 2
    expected = kd_loss(student.logits, mix, 2.0) + F.cross_entropy(mix, y)
    torch.testing.assert_close(term(student, teacher, batch), expected)
    assert "terms.ens.gate.net.0.weight" in obj.state_dict()
    opt = torch.optim.Adam(obj.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        obj(student, teacher, batch)["loss"].backward()
        opt.step()
    assert term.weights(teacher)[:, 0].mean() > 0.9


def test_ensemble_kd_trains_with_the_trainer_and_checkpoints_the_gate(tmp_path):
    from distill.engine.trainer import Trainer
    from distill.losses import CrossEntropy

    torch.manual_seed(0)
    x = torch.randn(40, 1, 8, 8)
    y = torch.randint(0, 5, (40,))
    ds = torch.utils.data.TensorDataset(x, y)
    ens = Ensemble(_models(), rule="learned")
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    obj = Objective({"ce": CrossEntropy(), "ens": EnsembleKD()}, {"ce": 0.5, "ens": 0.5})
    tr = Trainer(student, obj, ds, teacher=ens, val_data=ds, out_dir=tmp_path, epochs=2, progress="off")
    gate_before = obj.terms["ens"].gate.net[0].weight.clone()
    metrics = tr.fit()
    assert "accuracy" in metrics and "agreement" in metrics
    assert not torch.equal(gate_before, obj.terms["ens"].gate.net[0].weight)
    # Exported student weights hold no gate.
    from distill.checkpoint import load_weights_file

    best = load_weights_file(tmp_path / "checkpoints" / "student" / "best.safetensors")
    assert not any("gate" in k for k in best)


def test_ensemble_kd_without_ensemble_teacher_is_a_clear_error():
    term = EnsembleKD()
    with pytest.raises(DistillError, match="Ensemble teacher"):
        term.setup(Outputs(torch.zeros(2, 3)), Outputs(torch.zeros(2, 3)), Batch(torch.zeros(2, 1)))


def test_feature_term_per_member_through_the_trainer():
    """A feature term naming `t1.<path>` gets member 1's feature; the trainer routes the tap."""
    from distill.engine.trainer import Trainer
    from distill.losses import CrossEntropy
    from distill.losses.base import LossTerm

    class Hint(LossTerm):
        student_taps = ("1",)
        teacher_taps = ("t1.1",)

        def setup(self, student, teacher, batch):
            self.reg = nn.Linear(student.features["1"].shape[1], teacher.features["t1.1"].shape[1])

        def forward(self, student, teacher, batch):
            return F.mse_loss(self.reg(student.features["1"]), teacher.feature("t1.1", "teacher"))

    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,)))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5))
    ens = Ensemble(_models(), rule="entropy")
    obj = Objective({"ce": CrossEntropy(), "hint": Hint()})
    tr = Trainer(student, obj, ds, teacher=ens, epochs=1, progress="off", tensorboard=False)
    assert obj.terms["hint"].reg.out_features == 16  # member 1 (the mlp) has 16 hidden units
    tr.fit()
