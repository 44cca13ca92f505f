"""Speech: log-mel features, the Speech Commands folder loader, the espeak-ng set, the models."""

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("librosa")
sf = pytest.importorskip("soundfile")

from distill.data.speech import (  # noqa: E402
    LogMel,
    SpeechCommands,
    fingerprint,
    synthesize_speech,
    voice_split,
)
from distill.errors import DistillError  # noqa: E402
from distill.losses import KD  # noqa: E402
from distill.models.speech import DSCNN, SpeechCNN  # noqa: E402
from distill.outputs import Outputs, as_batch  # noqa: E402
from distill.registry import MODELS  # noqa: E402

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)


def test_log_mel_shapes():
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    feats = LogMel(16000, n_mels=40)(audio)
    assert feats.shape == (1, 40, 101) and feats.dtype == torch.float32
    assert LogMel(16000, n_mels=32, hop_ms=20)(audio).shape == (1, 32, 51)
    assert torch.isfinite(feats).all() and feats.max() <= 80.0


def test_voice_split_disjoint_and_deterministic():
    voices = [f"v{i}" for i in range(20)]
    split = voice_split(voices, seed=1)
    assert split == voice_split(voices, seed=1)
    assert split != voice_split(voices, seed=2)
    parts = [set(split[s]) for s in ("train", "val", "test")]
    assert set().union(*parts) == set(voices) and sum(map(len, parts)) == 20
    assert len(split["test"]) == 4 and len(split["val"]) == 3
    with pytest.raises(DistillError, match="at least 3 voices"):
        voice_split(["a", "b"])


def _write_folder(root):
    """A Speech Commands-style folder with tones instead of words (8 kHz, to exercise resampling)."""
    t = np.arange(8000) / 8000
    for w_i, word in enumerate(["up", "down"]):
        (root / word).mkdir(parents=True)
        for spk in ("alice", "bob", "carol"):
            sf.write(root / word / f"{spk}_nohash_0.wav", 0.3 * np.sin(2 * np.pi * 300 * (w_i + 1) * t), 8000)
    (root / "_background_noise_").mkdir()
    (root / "validation_list.txt").write_text("up/bob_nohash_0.wav\ndown/bob_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("up/carol_nohash_0.wav\ndown/carol_nohash_0.wav\n")


def test_speech_commands_folder(tmp_path):
    _write_folder(tmp_path)
    train = SpeechCommands(tmp_path, split="train")
    assert train.words == ["down", "up"] and len(train) == 2
    assert {train.voice(i) for i in range(len(train))} == {"alice"}
    x, y = train[0]
    assert x.shape == (1, 40, 101) and y == 0
    assert len(list((tmp_path / ".features").glob("*.npy"))) == 1  # features cached on disk
    again = SpeechCommands(tmp_path, split="train")
    assert torch.equal(again[0][0], x) and torch.equal(again[0][0], again.features(again.audio(0)))
    assert len(SpeechCommands(tmp_path, split="test")) == 2 and len(SpeechCommands(tmp_path, split=None)) == 6
    assert SpeechCommands(tmp_path, split=None, words=["up"]).labels == [0, 0, 0]
    with pytest.raises(DistillError, match="no word folders"):
        SpeechCommands(tmp_path, words=["left"])
    with pytest.raises(DistillError, match="not found"):
        SpeechCommands(tmp_path / "missing")


def test_speech_commands_keeps_only_the_named_speakers(tmp_path):
    _write_folder(tmp_path)
    everyone = SpeechCommands(tmp_path, split=None)
    two = SpeechCommands(tmp_path, split=None, speakers=("alice", "carol"))
    assert len(two) == 4 and {two.voice(i) for i in range(len(two))} == {"alice", "carol"}
    assert two.words == everyone.words  # the labels do not move when speakers are left out
    assert len(SpeechCommands(tmp_path, split=None, speakers="alice")) == 2  # one name, not its letters
    with pytest.raises(DistillError, match="by speakers bob"):
        SpeechCommands(tmp_path, split="train", speakers=["bob"])  # bob is a validation speaker


def test_speech_models():
    x = torch.randn(3, 1, 40, 101)
    teacher, student = SpeechCNN(num_classes=18), DSCNN(num_classes=18)
    assert teacher(x).shape == student(x).shape == (3, 18)
    assert student(x[:, 0]).shape == (3, 18)  # (B, n_mels, frames) accepted
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s * 20 < n_t
    assert MODELS.get("ds_cnn") is DSCNN and MODELS.get("speech_cnn") is SpeechCNN
    with pytest.raises(DistillError, match="n_mels"):
        student(torch.zeros(2, 2, 2, 2, 2))


@pytest.fixture(scope="module")
def tiny_speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("speech") / "set"
    kw = {
        "words": ("one", "two", "stop"),
        "voices": ("m1", "f2", "klatt", "Annie", "m3"),
        "clips_per_voice": 1,
    }
    return synthesize_speech(root, seed=0, **kw), kw


@needs_espeak
def test_synthesis_deterministic_given_seed(tiny_speech, tmp_path):
    root, kw = tiny_speech
    assert fingerprint(synthesize_speech(tmp_path / "again", seed=0, **kw)) == fingerprint(root)
    assert fingerprint(synthesize_speech(tmp_path / "other", seed=1, **kw)) != fingerprint(root)
    with pytest.raises(DistillError, match="overwrite"):
        synthesize_speech(root, seed=5, **kw)


@needs_espeak
def test_synthetic_split_by_voice(tiny_speech):
    root, kw = tiny_speech
    sets = {s: SpeechCommands(root, split=s, words=kw["words"]) for s in ("train", "val", "test")}
    voices = {s: {d.voice(i) for i in range(len(d))} for s, d in sets.items()}
    assert voices["train"] and voices["val"] and voices["test"]
    assert not voices["train"] & voices["test"] and not voices["train"] & voices["val"]
    assert voices["train"] | voices["val"] | voices["test"] == set(kw["voices"])
    assert sum(len(d) for d in sets.values()) == 3 * 5
    x, y = sets["train"][0]
    assert x.shape == (1, 40, 101) and 0 <= y < 3
    audio = sets["test"].audio(0)
    assert audio.shape == (16000,) and np.abs(audio).max() > 0.05  # speech, not silence


@needs_espeak
def test_speech_kd_step(tiny_speech):
    root, kw = tiny_speech
    ds = SpeechCommands(root, split="train", words=kw["words"])
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    batch = as_batch(next(iter(loader)))
    torch.manual_seed(0)
    teacher, student = SpeechCNN(3, width=8).eval(), DSCNN(3, width=16, blocks=2)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    with torch.no_grad():
        t_logits = teacher(batch.inputs)
    kd = KD(temperature=2.0)
    losses = []
    for _ in range(5):
        loss = kd(Outputs(logits=student(batch.inputs)), Outputs(logits=t_logits), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_speech_recipe_parses_and_builds_models():
    from pathlib import Path

    from distill.models.build import build_model
    from distill.run.config import load_recipe
    from distill.run.pipeline import build_objective

    cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "speech_digits.yaml")
    assert cfg.data.name == "speech_words"
    teacher = build_model({**cfg.teacher.spec(), "init_args": {**cfg.teacher.init_args, "num_classes": 18}})
    student = build_model({**cfg.student.spec(), "init_args": {**cfg.student.init_args, "num_classes": 18}})
    x = torch.randn(2, 1, 40, 101)
    assert teacher(x).shape == student(x).shape == (2, 18)
    assert set(build_objective(cfg).terms) == {"ce", "kd"}


@needs_espeak
def test_speech_data_bundle(tiny_speech):
    from distill.data.speech import speech_data

    root, kw = tiny_speech
    data = speech_data(root=root, seed=0, synth_seed=0, **kw)
    assert data.num_classes == 3 and data.input_shape == (1, 40, 101)
    assert len(data.train) + len(data.val) + len(data.test) == 15
    torch.manual_seed(0)
    assert data.train[0][0].shape == (1, 40, 101)


def test_speech_data_labels_only_some_training_voices(tiny_speech):
    from distill.data.speech import speech_data

    root, kw = tiny_speech
    full = speech_data(root=root, synth_seed=0, **kw)
    part = speech_data(root=root, synth_seed=0, train_voices=2, **kw)
    voices = {part.train.voice(i) for i in range(len(part.train))}
    assert len(voices) == 2 and voices < {full.train.voice(i) for i in range(len(full.train))}
    assert len(part.train) == 2 * 3  # 2 voices x 3 words x 1 clip
    assert part.val.files == full.val.files and part.test.files == full.test.files
    again = speech_data(root=root, synth_seed=0, train_voices=2, seed=5, **kw)
    assert again.train.files == part.train.files  # drawn from synth_seed, not the run's seed
    with pytest.raises(DistillError, match="train_voices 4"):
        speech_data(root=root, synth_seed=0, train_voices=4, **kw)


@needs_espeak
def test_transfer_set_speaks_fresh_clips_of_the_training_voices_only(tiny_speech, tmp_path):
    from distill.data.speech import speech_data

    root, kw = tiny_speech
    labelled = speech_data(root=root, seed=0, synth_seed=0, **kw)
    transfer = speech_data(root=tmp_path / "t", synth_seed=1, split_seed=0, splits=["train"], **kw)
    assert transfer.val is None and transfer.test is None
    voices = {transfer.train.voice(i) for i in range(len(transfer.train))}
    assert voices == {labelled.train.voice(i) for i in range(len(labelled.train))}
    assert len(transfer.train) == len(labelled.train)  # one clip per (word, training voice)
    # fresh clips: another synthesis seed draws other accents, speeds, pitches and noise
    a, b = labelled.train.audio(0), transfer.train.audio(0)
    assert labelled.train.files[0] == transfer.train.files[0] and not np.array_equal(a, b)
    with pytest.raises(DistillError, match="splits"):
        speech_data(root=tmp_path / "u", splits=["dev"], **kw)
