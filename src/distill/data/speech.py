"""Spoken-word recognition data: clips synthesised offline with espeak-ng, and a folder loader.

`synthesize_speech` speaks the ten digit words and a few command words with Debian's `espeak-ng`
over its voice variants (speaker timbres), accents, speeds and pitches, then shifts each
utterance in time inside a one-second window and adds noise at a random SNR. The result is a
folder in the Speech Commands layout (`<root>/<word>/<voice>_nohash_<k>.wav`, 16 kHz mono,
`validation_list.txt`, `testing_list.txt`), so `SpeechCommands` reads it exactly as it reads
the real Speech Commands set. The split is by voice: a voice variant heard in training is never
in the validation or test lists, so the test measures generalisation to unheard voices.

Everything is a function of the arguments and the seed (espeak-ng is deterministic). Features
are log-mel spectrograms computed with librosa.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.data.bundle import finish_generated_folder, start_generated_folder
from distill.errors import DistillError

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "stop", "go")
WORDS = DIGITS + COMMANDS

# espeak-ng voice variants (timbre: formants, breathiness, pitch range): the "speakers" of the set.
VOICES = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "Annie", "Andy", "adam", "anika",
    "benjamin", "belinda", "david", "ed", "grandpa", "iven", "john", "linda", "max", "michael",
    "paul", "robert", "steph", "quincy", "rob", "travis", "victor",
)  # fmt: skip
# English accents a clip may be spoken in; drawn per clip, so accents are shared across splits.
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
SAMPLE_RATE = 16_000
_VERSION = 1
SPLITS = ("train", "val", "test")


def espeak_binary() -> str:
    """The espeak-ng executable, or a one-line error saying how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DistillError(
            "espeak-ng is not installed; the synthetic speech set needs it: apt-get install espeak-ng"
        )
    return exe


def speak(text: str, voice: str, accent: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """One utterance from espeak-ng, resampled to 16 kHz mono float32 in [-1, 1].

    Args:
        voice: a variant name (one of `VOICES`, or any of `espeak-ng --voices=variant`).
        accent: an espeak-ng English voice (`en-us`, `en-gb`, ...).
        speed: words per minute (80..450).
        pitch: 0..99.
    """
    import librosa
    import soundfile as sf

    cmd = [
        espeak_binary(),
        "-v",
        f"{accent}+{voice}",
        "-s",
        str(int(speed)),
        "-p",
        str(int(pitch)),
        "--stdout",
        text,
    ]
    try:
        wav = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    except subprocess.CalledProcessError as e:
        raise DistillError(
            f"espeak-ng failed on {text!r} with voice {accent}+{voice}: {e.stderr.decode()[:200]}"
        ) from e
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(1)
    if sr != SAMPLE_RATE:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=SAMPLE_RATE)
    return audio.astype(np.float32)


def _place(
    rng: np.random.Generator, speech: np.ndarray, length: int, snr_db: tuple[float, float], max_shift: float
) -> np.ndarray:
    """Trims silence, shifts the word to a random offset in a `length` window, adds noise."""
    import librosa

    speech, _ = librosa.effects.trim(speech, top_db=35)
    if len(speech) > length:  # very slow speech: keep the middle
        start = (len(speech) - length) // 2
        speech = speech[start : start + length]
    free = length - len(speech)
    centre = free // 2
    shift = int(rng.uniform(-max_shift, max_shift) * length)
    offset = int(np.clip(centre + shift, 0, free))
    clip = np.zeros(length, dtype=np.float32)
    clip[offset : offset + len(speech)] = speech * rng.uniform(0.5, 1.0) / max(1e-3, np.abs(speech).max())
    # Noise: white plus a random share of brown (integrated) noise, scaled to a random SNR.
    white = rng.standard_normal(length)
    brown = np.cumsum(rng.standard_normal(length))
    brown = (brown - brown.mean()) / (brown.std() + 1e-8)
    mix = rng.uniform(0, 1)
    noise = ((1 - mix) * white + mix * brown).astype(np.float32)
    p_speech = float(np.mean(clip[offset : offset + len(speech)] ** 2)) if len(speech) else 1e-4
    snr = rng.uniform(*snr_db)
    noise *= np.sqrt(p_speech / (10 ** (snr / 10)) / (np.mean(noise**2) + 1e-12))
    return np.clip(clip + noise, -1, 1).astype(np.float32)


def voice_split(
    voices: Sequence[str], seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> dict[str, list[str]]:
    """Assigns whole voices to train / val / test (at least one voice each when there are 3+)."""
    voices = list(dict.fromkeys(voices))
    if len(voices) < 3:
        raise DistillError(f"need at least 3 voices to split by voice (train/val/test), got {len(voices)}")
    order = [voices[i] for i in np.random.default_rng(seed).permutation(len(voices))]
    n_test = max(1, round(test_fraction * len(voices)))
    n_val = max(1, round(val_fraction * len(voices)))
    if n_test + n_val >= len(voices):
        raise DistillError(f"val_fraction + test_fraction leave no training voice among {len(voices)}")
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


def synthesize_speech(
    root: str | os.PathLike,
    words: Sequence[str] = WORDS,
    voices: Sequence[str] = VOICES,
    clips_per_voice: int = 2,
    accents: Sequence[str] = ACCENTS,
    speed_range: tuple[int, int] = (120, 220),
    pitch_range: tuple[int, int] = (25, 75),
    snr_db: tuple[float, float] = (5.0, 30.0),
    max_shift: float = 0.2,
    clip_seconds: float = 1.0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_seed: int | None = None,
    splits: Sequence[str] = SPLITS,
    overwrite: bool = False,
) -> Path:
    """Writes the synthetic spoken-word set to `root` (Speech Commands layout) and returns `root`.

    Each (word, voice) pair is spoken `clips_per_voice` times with a random accent, speed and
    pitch, time shift and noise. A folder made with the same arguments is reused; one made with
    other arguments is an error unless `overwrite=True`. Written under a temporary name and
    renamed at the end, so an interrupted run leaves nothing half-made.

    Args:
        words: the classes (any text espeak-ng can say).
        voices: espeak-ng voice variants; split whole across train / val / test.
        clips_per_voice: clips per (word, voice).
        accents, speed_range, pitch_range: drawn uniformly per clip.
        snr_db: noise level range (dB of speech over noise).
        max_shift: the word's offset moves up to this fraction of the window from the centre.
        clip_seconds: window length.
        val_fraction, test_fraction: shares of the voices held out.
        seed: the set is a function of the arguments and this seed.
        split_seed: the seed of the voice split (default `seed`). A second set with another `seed`
            and the first set's seed here has fresh clips of the same voices in each split: a
            transfer set that holds no clip, and no voice, of the first set's val/test splits.
        splits: speak only the voices of these splits (`["train"]` for a transfer set).
    """
    import soundfile as sf

    espeak_binary()
    words, voices, accents = list(words), list(dict.fromkeys(voices)), list(accents)
    if len(set(words)) != len(words) or not words:
        raise DistillError(f"words must be distinct and non-empty, got {words}")
    if clips_per_voice < 1:
        raise DistillError(f"clips_per_voice must be >= 1, got {clips_per_voice}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise DistillError(f"splits: {unknown or '[]'} is not a subset of {list(SPLITS)}")
    split = voice_split(voices, seed if split_seed is None else split_seed, val_fraction, test_fraction)
    manifest = {
        "generator": "distill.data.speech",
        "version": _VERSION,
        "words": words,
        "voices": voices,
        "clips_per_voice": clips_per_voice,
        "accents": accents,
        "speed_range": list(speed_range),
        "pitch_range": list(pitch_range),
        "snr_db": list(snr_db),
        "max_shift": max_shift,
        "clip_seconds": clip_seconds,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    # recorded only when set, so a folder made before these arguments existed is still reused
    if split_seed is not None:
        manifest["split_seed"] = split_seed
    if tuple(splits) != SPLITS:
        manifest["splits"] = sorted(splits)
    root = Path(root)
    tmp = start_generated_folder(root, manifest, overwrite)
    if tmp is None:
        return root
    length = int(round(clip_seconds * SAMPLE_RATE))
    lists: dict[str, list[str]] = {"val": [], "test": []}
    split_of = {v: s for s, vs in split.items() for v in vs}
    clips = []
    try:
        for w_i, word in enumerate(words):
            folder = tmp / _folder_name(word)
            folder.mkdir(parents=True)
            for v_i, voice in enumerate(voices):
                if split_of[voice] not in splits:
                    continue
                for k in range(clips_per_voice):
                    # One generator per clip: a clip does not change when others are added.
                    rng = np.random.default_rng([seed, w_i, v_i, k])
                    accent = accents[int(rng.integers(len(accents)))]
                    speed = int(rng.integers(speed_range[0], speed_range[1] + 1))
                    pitch = int(rng.integers(pitch_range[0], pitch_range[1] + 1))
                    audio = _place(rng, speak(word, voice, accent, speed, pitch), length, snr_db, max_shift)
                    rel = f"{_folder_name(word)}/{voice}_nohash_{k}.wav"
                    sf.write(tmp / rel, audio, SAMPLE_RATE, subtype="PCM_16")
                    if split_of[voice] in lists:
                        lists[split_of[voice]].append(rel)
                    clips.append(
                        {
                            "file": rel,
                            "word": word,
                            "voice": voice,
                            "accent": accent,
                            "speed": speed,
                            "pitch": pitch,
                        }
                    )
        (tmp / "validation_list.txt").write_text("\n".join(lists["val"]) + "\n")
        (tmp / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n")
        (tmp / "voices.json").write_text(json.dumps({"split": split, "clips": clips}, indent=0))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        finish_generated_folder(tmp, root, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _folder_name(word: str) -> str:
    return word.strip().replace(" ", "_").replace("/", "_")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LogMel:
    """Log-mel spectrogram of a mono clip, via librosa.

    Args:
        sample_rate: of the input audio.
        n_mels: mel bands.
        win_ms, hop_ms: analysis window and hop (defaults: 30 ms / 10 ms, the usual for keyword spotting).
        fmin, fmax: mel band range in Hz (fmax default: sample_rate / 2).

    `__call__(audio (T,) float) -> (1, n_mels, frames)` float32 tensor in dB (ref = 1, floor -80 dB).
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_mels: int = 40,
        win_ms: float = 30.0,
        hop_ms: float = 10.0,
        fmin: float = 20.0,
        fmax: float | None = None,
    ):
        if n_mels < 1 or win_ms <= 0 or hop_ms <= 0:
            raise DistillError(
                f"LogMel needs n_mels >= 1 and positive win_ms, hop_ms; got {n_mels}, {win_ms}, {hop_ms}"
            )
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.n_fft = int(round(sample_rate * win_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.fmin = fmin
        self.fmax = fmax
        self._basis: np.ndarray | None = None

    def frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop  # librosa's centred framing

    def key(self) -> str:
        """Identifies the feature settings (part of the on-disk feature cache key)."""
        return (
            f"logmel-sr{self.sample_rate}-m{self.n_mels}-n{self.n_fft}-h{self.hop}-f{self.fmin}-{self.fmax}"
        )

    def __call__(self, audio: np.ndarray) -> Tensor:
        import librosa

        if self._basis is None:  # the mel filterbank is the same for every clip: build it once
            self._basis = librosa.filters.mel(
                sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax
            )
        power = (
            np.abs(librosa.stft(np.asarray(audio, dtype=np.float32), n_fft=self.n_fft, hop_length=self.hop))
            ** 2
        )
        db = librosa.power_to_db(self._basis @ power, ref=1.0, amin=1e-10, top_db=80.0)
        return torch.from_numpy(db.astype(np.float32)).unsqueeze(0)  # (1, n_mels, frames)


class SpeechCommands(torch.utils.data.Dataset):
    """A folder of WAV clips in the Speech Commands layout: `<root>/<word>/*.wav`.

    The split follows Speech Commands: files listed in `validation_list.txt` are "val", those in
    `testing_list.txt` are "test", the rest "train". Folders starting with "_" (such as
    `_background_noise_`) are skipped. Clips are resampled to `sample_rate`, padded or cut to
    `clip_seconds`, and turned into log-mel features; features are computed once and kept.

    Args:
        root: the folder.
        split: "train", "val", "test", or None for every clip.
        words: the classes in label order (default: every word folder, sorted).
        sample_rate, clip_seconds: what every clip is brought to.
        features: a callable audio -> tensor (default `LogMel(sample_rate)`).
        cache: compute every clip's features once and keep them in `<root>/.features/` (an .npy
            keyed by the feature settings and the clips' names, sizes and times), so later runs
            on the same folder start at once. Needs a `key()` method on `features`.
        time_shift: augmentation: roll each access's features by up to this many frames either
            way (drawn from torch's global RNG, so a seeded run sees the same views).
        speakers: keep only the clips of these speakers (the file name's part before `_nohash_`).

    Item `i` is `(features (1, n_mels, frames) float32, label int)`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        words: Sequence[str] | None = None,
        sample_rate: int = SAMPLE_RATE,
        clip_seconds: float = 1.0,
        features: Any = None,
        cache: bool = True,
        time_shift: int = 0,
        speakers: Sequence[str] | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DistillError(f"speech folder {root} not found; it should hold <word>/*.wav folders")
        if split not in ("train", "val", "test", None):
            raise DistillError(f"split must be train, val, test or None, got '{split}'")
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        if words is None:
            words = present
        missing = [w for w in words if _folder_name(w) not in present]
        if missing or not words:
            raise DistillError(
                f"no word folders {missing or ''} in {root}; found {', '.join(present) or 'none'}"
            )
        self.root = root
        self.words = list(words)
        self.sample_rate = sample_rate
        self.length = int(round(clip_seconds * sample_rate))
        self.features = features or LogMel(sample_rate)
        self.time_shift = int(time_shift)
        held = {
            s: _read_list(root / f) for s, f in (("val", "validation_list.txt"), ("test", "testing_list.txt"))
        }
        if speakers is not None:
            speakers = {speakers} if isinstance(speakers, str) else set(speakers)
        self.files: list[str] = []
        self.labels: list[int] = []
        for label, word in enumerate(self.words):
            for path in sorted((root / _folder_name(word)).glob("*.wav")):
                rel = f"{path.parent.name}/{path.name}"
                where = "val" if rel in held["val"] else "test" if rel in held["test"] else "train"
                if speakers is not None and _speaker(path.name) not in speakers:
                    continue
                if split is None or where == split:
                    self.files.append(rel)
                    self.labels.append(label)
        if not self.files:
            who = f" by speakers {', '.join(sorted(speakers))}" if speakers is not None else ""
            raise DistillError(f"no .wav clips for split '{split}'{who} in {root}")
        self._cache: dict[int, Tensor] = {}
        if cache and hasattr(self.features, "key"):
            self._load_or_build_cache()

    def _cache_path(self) -> Path:
        h = hashlib.sha256(f"{self.features.key()}|{self.sample_rate}|{self.length}".encode())
        for rel in self.files:
            st = (self.root / rel).stat()
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return self.root / ".features" / f"{h.hexdigest()[:20]}.npy"

    def _load_or_build_cache(self) -> None:
        from distill.checkpoint import atomic_write

        path = self._cache_path()
        if path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.shape[0] == len(self.files):
                    self._cache = dict(enumerate(torch.from_numpy(arr).unbind(0)))
                    return
            except (OSError, ValueError):
                pass  # unreadable cache: rebuild it
        arr = np.stack([self.features(self.audio(i)).numpy() for i in range(len(self.files))])
        self._cache = dict(enumerate(torch.from_numpy(arr).unbind(0)))

        def write(tmp):
            with open(tmp, "wb") as f:  # a handle: np.save would append ".npy" to a temp name
                np.save(f, arr, allow_pickle=False)

        with contextlib.suppress(OSError):  # a read-only folder still works, only without the cache
            atomic_write(path, write)

    @property
    def num_classes(self) -> int:
        return len(self.words)

    def voice(self, i: int) -> str:
        """The speaker id of clip `i` (the part of the file name before `_nohash_`)."""
        return _speaker(Path(self.files[i]).name)

    def audio(self, i: int) -> np.ndarray:
        import librosa
        import soundfile as sf

        path = self.root / self.files[i]
        try:
            x, sr = sf.read(path, dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as e:
            raise DistillError(f"cannot read {path} ({e})") from e
        x = x.mean(1)
        if sr != self.sample_rate:
            x = librosa.resample(x, orig_sr=sr, target_sr=self.sample_rate)
        if len(x) < self.length:
            x = np.pad(x, (0, self.length - len(x)))
        return x[: self.length]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if i not in self._cache:
            self._cache[i] = self.features(self.audio(i))
        x = self._cache[i]
        if self.time_shift:
            x = torch.roll(x, int(torch.randint(-self.time_shift, self.time_shift + 1, ()).item()), dims=-1)
        return x, self.labels[i]


def _speaker(file_name: str) -> str:
    """The speaker id in a Speech Commands file name (`<speaker>_nohash_<k>.wav`)."""
    return file_name.split("_nohash_")[0]


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def speech_digits(
    root: str | os.PathLike, split: str = "train", seed: int = 0, n_mels: int = 40, **synth: Any
) -> SpeechCommands:
    """The synthetic set (made on first use, then reused from `root`) as a `SpeechCommands` split."""
    root = synthesize_speech(root, seed=seed, **synth)
    words = _read_json(Path(root) / "manifest.json")["words"]
    return SpeechCommands(root, split=split, words=words, features=LogMel(SAMPLE_RATE, n_mels=n_mels))


def speech_data(
    root: str | os.PathLike | None = None,
    words: Sequence[str] = WORDS,
    voices: Sequence[str] = VOICES,
    clips_per_voice: int = 2,
    n_mels: int = 40,
    time_shift: int = 10,
    folder: str | os.PathLike | None = None,
    synth_seed: int = 0,
    split_seed: int | None = None,
    splits: Sequence[str] = SPLITS,
    train_voices: int | None = None,
    seed: int = 0,
    **synth: Any,
):
    """Spoken-word recognition as a recipe's `data`: a `DataBundle` of train/val/test.

    With `folder` set, reads a user's Speech Commands folder (its own split lists) instead of
    synthesising. Otherwise the espeak-ng set is made once under `root` (default
    `<data dir>/speech-<hash of the arguments>`) from `synth_seed`, split by voice; the run's
    `seed` does not change the data.

    Args:
        time_shift: training augmentation, in feature frames (10 ms each).
        train_voices: label only this many of the training split's speakers (drawn once from
            `synth_seed`; val and test unchanged): few labelled speakers, the usual case beside a
            transfer set of unlabelled audio from many.
        split_seed, splits: see `synthesize_speech`. A transfer set (`data.transfer`) of fresh
            utterances by the labelled set's training voices: another `synth_seed`, `split_seed`
            the labelled set's `synth_seed`, `splits: [train]` (its val/test are then None).
        synth: further `synthesize_speech` arguments (snr_db, speed_range, ...).
    """
    from distill.data.bundle import DataBundle
    from distill.data.shapes import default_data_dir

    if folder is not None:
        root, word_list = Path(folder), (list(words) if words is not None else None)
    else:
        if split_seed is not None:  # (in the folder's key only when set: older folders keep theirs)
            synth["split_seed"] = split_seed
        if tuple(splits) != SPLITS:
            synth["splits"] = list(splits)
        key = json.dumps(
            [list(words), list(voices), clips_per_voice, synth_seed, sorted(synth.items())], default=str
        )
        root = (
            Path(root)
            if root is not None
            else default_data_dir() / f"speech-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        )
        root = synthesize_speech(
            root, words=words, voices=voices, clips_per_voice=clips_per_voice, seed=synth_seed, **synth
        )
        word_list = list(words)
    feats = LogMel(SAMPLE_RATE, n_mels=n_mels)
    keep = None
    if train_voices is not None:  # (the clip list alone, no features, names the speakers)
        listed = SpeechCommands(root, "train", word_list, features=feats, cache=False)
        have = sorted({listed.voice(i) for i in range(len(listed))})
        if not 1 <= train_voices <= len(have):
            raise DistillError(f"speech_data: train_voices {train_voices} must be in [1, {len(have)}]")
        keep = [have[i] for i in np.random.default_rng(synth_seed).permutation(len(have))[:train_voices]]
    train = SpeechCommands(root, "train", word_list, features=feats, time_shift=time_shift, speakers=keep)
    spoken = SPLITS if folder is not None else splits  # (a transfer set spoke the train split only)
    val = SpeechCommands(root, "val", train.words, features=feats) if "val" in spoken else None
    test = SpeechCommands(root, "test", train.words, features=feats) if "test" in spoken else None
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=train.num_classes,
        input_shape=tuple(train[0][0].shape),
        meta={"root": str(root), "words": train.words, "task": "speech"},
    )


def fingerprint(root: str | os.PathLike) -> str:
    """A short hash of every clip's bytes, to check two syntheses are identical."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*.wav")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
