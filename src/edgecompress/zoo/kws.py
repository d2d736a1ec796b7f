"""Keyword spotting: speech made offline by espeak-ng, MFCC features, MLPerf Tiny's DS-CNN.

The ten Speech Commands keywords plus "silence" (background noise alone) and "unknown" (25 other
words: Speech Commands' other 20 core words and its 5 auxiliary ones) are spoken by Debian's
``espeak-ng`` in many voices — a voice is one of its ``!v`` variants (formants, breath, tone), each
utterance in a random English accent, speed and pitch — resampled to 16 kHz, trimmed, placed at a
random time in a 1 s clip and mixed with generated background noise (white, pink, brown or mains
hum) at a random signal-to-noise ratio. The split is by voice: validation and test voices (and
variants of them, such as iven2 of iven) are never heard in training.

Features are MLPerf Tiny KWS's: 49 frames x 10 MFCC from 40 ms Hann windows at a 20 ms stride
(FFT 1024, 40 mel bands 20-4000 Hz, log, orthonormal DCT-II), written here in numpy (a mel
filterbank and a DCT matrix are a few lines; no audio package needed); espeak-ng's 22,050 Hz output
is resampled to 16 kHz in the FFT domain.

The data set is built once (about 2,600 espeak-ng calls, two at a time) and cached under
``$EDGECOMPRESS_CACHE`` as safetensors whose name carries a hash of everything that shapes it
(the configuration, the seed and espeak-ng's version) and whose metadata holds the SHA-256 of its
contents, checked on every load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from ..files import write_atomic
from .models import conv_bn, seq

log = logging.getLogger(__name__)

KWS_VERSION = 2
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LABELS = KEYWORDS + ("silence", "unknown")
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine",
                 "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero",
                 "backward", "forward", "follow", "learn", "visual")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
# espeak-ng 1.51's voice variants (espeak-ng-data/voices/!v), all but "Mr serious" (a space in its name)
VOICES = ("Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo", "Gene",
          "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
          "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "UniRobot", "adam", "anika",
          "anikaRobot", "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "croak",
          "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5", "fast", "grandma", "grandpa",
          "gustave", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta", "klatt", "klatt2", "klatt3",
          "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo",
          "max", "michel", "miguel", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert",
          "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7",
          "robosoft8", "sandro", "shelby", "steph", "steph2", "steph3", "travis", "victor", "whisper",
          "whisperf", "zac")

RATE = 16_000
ESPEAK_RATE = 22_050
FRAME, STRIDE, NFFT, MELS, MFCC = 640, 320, 1024, 40, 10
FRAMES = 1 + (RATE - FRAME) // STRIDE  # 49
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Config:
    """What shapes the data set. Per voice: ``keyword_takes`` utterances of each keyword,
    ``unknown_takes`` of random other words and ``silence_takes`` noise-only clips; training clips are
    mixed ``train_copies`` times with fresh noise and shifts."""

    voices: tuple[str, ...] = VOICES
    val_voices: int = 10
    test_voices: int = 20
    keyword_takes: int = 2
    unknown_takes: int = 4
    silence_takes: int = 2
    train_copies: int = 2
    speed: tuple[int, int] = (120, 210)     # espeak-ng words per minute
    pitch: tuple[int, int] = (25, 80)       # espeak-ng pitch, 0-99
    snr_db: tuple[float, float] = (5.0, 25.0)
    gain_db: tuple[float, float] = (-12.0, 0.0)
    workers: int = 2


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at")[0].strip()


def voice_family(voice: str) -> str:
    """Variants that differ only by a number or a "Robot" suffix (iven, iven2; anika, anikaRobot)
    are one family and always fall in the same split; m1..m8 and f1..f5 are distinct voices."""
    stem = re.sub(r"(\d+|Robot)$", "", voice)
    return stem if len(stem) > 1 else voice


def voice_split(cfg: Config, seed: int) -> dict[str, tuple[str, ...]]:
    """Voices of each split, whole families at a time in a seeded order: test until it holds at
    least ``test_voices``, then validation until ``val_voices``, the rest train."""
    families: dict[str, list[str]] = {}
    for v in cfg.voices:
        families.setdefault(voice_family(v), []).append(v)
    keys = list(families)
    out: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for i in np.random.default_rng([seed, 1]).permutation(len(keys)):
        split = ("test" if len(out["test"]) < cfg.test_voices else
                 "val" if len(out["val"]) < cfg.val_voices else "train")
        out[split] += families[keys[i]]
    return {k: tuple(sorted(v)) for k, v in out.items()}


def speak(word: str, voice: str, accent: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance by espeak-ng as float32 at 16 kHz, silence trimmed, at most 1 s."""
    cmd = ["espeak-ng", "-v", f"{accent}+{voice}", "-s", str(speed), "-p", str(pitch), "--stdout", word]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    pcm = wav[wav.index(b"data") + 8:]
    x = np.frombuffer(pcm[:len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    n = round(len(x) * RATE / ESPEAK_RATE)  # 22,050 -> 16,000 Hz: ideal low-pass in the FFT domain
    x = (np.fft.irfft(np.fft.rfft(x)[:n // 2 + 1], n) * (n / max(len(x), 1))).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(float(np.abs(x).max()), 1e-6))
    x = x[max(loud[0] - 160, 0):loud[-1] + 160] if len(loud) else x
    return x[:RATE]


def _noise(rng: np.random.Generator) -> np.ndarray:
    """One second of background noise with unit RMS: white, pink, brown or mains hum over hiss."""
    kind = rng.integers(4)
    if kind == 3:
        t = np.arange(RATE) / RATE
        f0 = (50.0, 60.0)[rng.integers(2)]
        x = sum(rng.uniform(0.2, 1) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
                for h in range(1, 8))
        x = x + 0.1 * rng.standard_normal(RATE)
    else:
        spec = np.fft.rfft(rng.standard_normal(RATE))
        f = np.maximum(np.fft.rfftfreq(RATE, 1 / RATE), 20.0)
        x = np.fft.irfft(spec / f ** (0.5 * kind), RATE)  # 1/f^0 white, 1/f pink, 1/f^2 brown power
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def mix(clip: np.ndarray | None, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """A 1 s example: ``clip`` at a random offset over noise at a random SNR (noise alone for
    silence), at a random overall level."""
    out = np.zeros(RATE, np.float32)
    noise = _noise(rng)
    if clip is None:
        out += noise * 10 ** rng.uniform(-3.0, -1.0)
    else:
        clip = clip / (float(np.abs(clip).max()) + 1e-12)
        start = rng.integers(RATE - len(clip) + 1)
        out[start:start + len(clip)] = clip
        rms = float(np.sqrt(np.mean(clip ** 2)))
        out += noise * rms * 10 ** (-rng.uniform(*cfg.snr_db) / 20)
    out *= 10 ** (rng.uniform(*cfg.gain_db) / 20) / max(float(np.abs(out).max()), 1.0)
    return out


@lru_cache(maxsize=1)
def _mel_dct() -> tuple[np.ndarray, np.ndarray]:
    """The 513 x 40 mel filterbank (HTK mel scale, 20-4000 Hz, triangles) and the 40 x 10 DCT-II."""
    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f) / 700.0)

    edges = np.linspace(mel(20.0), mel(4000.0), MELS + 2)
    bins = mel(np.fft.rfftfreq(NFFT, 1 / RATE))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    fb = np.maximum(0, np.minimum((bins[:, None] - lo) / (mid - lo), (hi - bins[:, None]) / (hi - mid)))
    n = np.arange(MELS)
    dct = np.cos(np.pi / MELS * (n[:, None] + 0.5) * np.arange(MFCC)) * np.sqrt(2.0 / MELS)
    dct[:, 0] /= np.sqrt(2.0)  # orthonormal DCT-II
    return fb.astype(np.float32), dct.astype(np.float32)


def mfcc(audio: np.ndarray) -> np.ndarray:
    """(N, 16000) audio -> (N, 49, 10) MFCC, as MLPerf Tiny KWS computes them."""
    fb, dct = _mel_dct()
    window = np.hanning(FRAME + 1)[:-1].astype(np.float32)  # periodic Hann
    idx = np.arange(FRAMES)[:, None] * STRIDE + np.arange(FRAME)
    out = np.empty((len(audio), FRAMES, MFCC), np.float32)
    for s in range(0, len(audio), 256):
        frames = audio[s:s + 256][:, idx] * window
        mag = np.abs(np.fft.rfft(frames, NFFT)).astype(np.float32)
        out[s:s + 256] = np.log(mag @ fb + 1e-6) @ dct
    return out


def _plan(cfg: Config, seed: int) -> list[tuple]:
    """Every clip to make, in a fixed order: (split, voice index, label, word or None, espeak args)."""
    split_of = {v: s for s, vs in voice_split(cfg, seed).items() for v in vs}
    plan = []
    for vi, voice in enumerate(cfg.voices):
        rng = np.random.default_rng([seed, 2, vi])
        words = [(k, w) for k, w in enumerate(KEYWORDS) for _ in range(cfg.keyword_takes)]
        words += [(len(LABELS) - 1, UNKNOWN_WORDS[rng.integers(len(UNKNOWN_WORDS))]) for _ in range(cfg.unknown_takes)]
        for label, word in words:
            args = (word, voice, ACCENTS[rng.integers(len(ACCENTS))], int(rng.integers(cfg.speed[0], cfg.speed[1] + 1)),
                    int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1)))
            plan.append((split_of[voice], vi, label, args))
        plan += [(split_of[voice], vi, len(KEYWORDS), None)] * cfg.silence_takes
    return plan


def build(cfg: Config = Config(), seed: int = 0) -> dict[str, np.ndarray]:
    """The data set as arrays: ``x`` (N, 1, 49, 10) float32 MFCC, ``y`` labels (index into LABELS),
    ``voice`` (index into ``cfg.voices``), ``split`` (index into SPLITS). Deterministic for a seed."""
    plan = _plan(cfg, seed)
    with ThreadPoolExecutor(max(1, min(cfg.workers, 2))) as pool:  # each worker drives one espeak-ng process
        clips = list(pool.map(lambda p: None if p[3] is None else speak(*p[3]), plan))
    audio, y, voice, split = [], [], [], []
    for i, ((sp, vi, label, _), clip) in enumerate(zip(plan, clips)):
        for c in range(cfg.train_copies if sp == "train" else 1):
            audio.append(mix(clip, cfg, np.random.default_rng([seed, 3, i, c])))
            y.append(label), voice.append(vi), split.append(SPLITS.index(sp))
    x = mfcc(np.stack(audio))[:, None]
    return {"x": x, "y": np.array(y, np.int64), "voice": np.array(voice, np.int64), "split": np.array(split, np.int64)}


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(cfg: Config, seed: int) -> str:
    text = json.dumps({"v": KWS_VERSION, "seed": seed, "espeak": espeak_version(),
                       "cfg": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_build(cfg: Config = Config(), seed: int = 0) -> dict[str, np.ndarray]:
    """The cached data set, or built now and cached; a file whose contents do not match its recorded
    hash is rebuilt."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import save_file

    from .cache import cache_dir

    path = cache_dir() / f"kws-v{KWS_VERSION}-{cache_key(cfg, seed)}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="numpy") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
                recorded = (f.metadata() or {}).get("sha256")
            if recorded == content_hash(arrays):
                return arrays
            log.warning("cached KWS data %s does not match its hash; building it again", path)
        except (SafetensorError, OSError) as e:
            log.warning("cached KWS data %s is unreadable (%s); building it again", path, e)
    arrays = build(cfg, seed)
    write_atomic(path, lambda tmp: save_file(arrays, str(tmp), metadata={"sha256": content_hash(arrays)}))
    return arrays


Split = tuple[torch.Tensor, torch.Tensor]


@lru_cache(maxsize=1)
def speech(seed: int = 0) -> tuple[Split, Split, Split]:
    """Train, validation and test splits of the built-in KWS data: (N, 1, 49, 10) MFCC and labels."""
    a = load_or_build(Config(), seed)
    return tuple((torch.from_numpy(a["x"][a["split"] == s]).clone(), torch.from_numpy(a["y"][a["split"] == s]).clone())
                 for s in range(3))  # type: ignore[return-value]


def ds_cnn(classes: int = len(LABELS), width: int = 64, blocks: int = 4) -> nn.Module:
    """MLPerf Tiny's DS-CNN for keyword spotting (Zhang et al., Hello Edge, DS-CNN-S): a 10x4 conv of
    64 channels at stride 2 (symmetric padding 5x1, giving TensorFlow's 25x5 "same" output), four
    depthwise-separable blocks (3x3 depthwise, 1x1 pointwise, each with batch norm and ReLU), average
    pooling over the map, dropout 0.2 / 0.4 as in the reference, and a 12-way linear layer."""
    layers = dict(stem=seq(conv=nn.Conv2d(1, width, (10, 4), 2, (5, 1), bias=False), bn=nn.BatchNorm2d(width),
                            relu=nn.ReLU()), drop1=nn.Dropout(0.2))
    for i in range(1, blocks + 1):
        layers[f"ds{i}"] = seq(dw=conv_bn(width, width, 3, groups=width, act=nn.ReLU()),
                                pw=conv_bn(width, width, 1, act=nn.ReLU()))
    layers.update(drop2=nn.Dropout(0.4), gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                  fc=nn.Linear(width, classes))
    return seq(**layers)
