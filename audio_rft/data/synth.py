"""The built-in synthetic bench: MMAU-style multiple-choice questions answerable only by listening.

Nine sub-categories, three per task (table `SUBS`). Each is one small generator
`gen(rng, answer, level, test) -> (waveform, reasoning)` that renders a 2-4 s, 16 kHz clip for a
given answer at difficulty level 0/1/2 (easy/medium/hard), plus a table of question phrasings split
into train and held-out test phrasings. The test split also shifts the parameter ranges a little
(frequencies, cut-offs, durations; 3 dB more noise) while keeping the answer space, so a model is
measured on generalisation, not memorisation.

Item j of a split is fully determined by (seed, split, j): sub-category = j mod 9, and the answer
cycles through a seeded permutation of the sub-category's answers, so answers are balanced within
every sub-category and every prefix of the dataset is balanced too. Choices are the whole answer
space in a shuffled order, so question text and choices alone give chance.

Signals are designed to be separable on a Whisper-style 64-bin log-mel (n_fft 400, hop 160) and,
except melody direction, to carry their cue in which frequencies sound rather than in the order of
events: the tiny model learns such cues within the demo's minutes and never learned counting, tempo or
loudness trends (version 1; data_prep/synth.md has the measurements).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

from audio_rft import UserError
from audio_rft.data.audio import SAMPLE_RATE as SR
from audio_rft.data.dataset import DatasetWriter
from audio_rft.data.schema import Sample

VERSION = 2
LEVELS = ("easy", "medium", "hard")
SNR_DB = (30.0, 18.0, 9.0)  # white noise per level; the test split is 3 dB noisier
MAX_SECONDS = 4.0  # the tiny model's audio window
NUM = ("zero", "one", "two", "three", "four", "five")
SPLITS = {"train": 0, "test": 1}


# ---------------------------------------------------------------- signal helpers

def _n(seconds: float) -> int:
    return int(round(seconds * SR))


def _tone(freq, n: int, harmonics=(1.0,)) -> np.ndarray:
    """Phase-continuous harmonic tone; `freq` is a scalar or a per-sample array (glides).

    One band-limited cycle (harmonics under 7.6 kHz) is tabulated, then read at the running phase."""
    freq = np.broadcast_to(np.asarray(freq, float), (n,))
    grid = np.linspace(0, 2 * np.pi, 1025)
    table = sum(a * np.sin(k * grid) for k, a in enumerate(harmonics, 1) if k * freq.max() < 7600)
    return np.interp(np.cumsum(freq) / SR % 1.0 * 1024, np.arange(1025), table)


def _fade(x: np.ndarray, ms: float = 10.0) -> np.ndarray:
    k = min(_n(ms / 1000), len(x) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
    x = x.copy()
    x[:k] *= ramp
    x[len(x) - k:] *= ramp[::-1]
    return x


def _peak_faded(x: np.ndarray, ms: float) -> np.ndarray:
    """Scaled to peak 1, with `ms` fades: the mix level is set later, per item."""
    return _fade(x / (np.abs(x).max() + 1e-9), ms)


def _filtered_noise(rng, n: int, cutoff, btype: str) -> np.ndarray:
    """White noise through a 4th-order Butterworth (`btype` "highpass", "lowpass" or "bandpass")."""
    return sosfilt(butter(4, cutoff, btype, fs=SR, output="sos"), rng.standard_normal(n))


def _put(clip: np.ndarray, x: np.ndarray, t: float) -> None:
    i = _n(t)
    clip[i:i + len(x)] += x[: len(clip) - i]


def _wave(kind: str, f0: float, n: int, rolloff: float = 1.0) -> np.ndarray:
    if kind == "sine wave":
        return _tone(f0, n)
    ks = np.arange(1, 40)
    amps = np.where((ks % 2 == 1) | (kind == "sawtooth wave"), 1.0 / ks**rolloff, 0.0)
    return _tone(f0, n, tuple(amps))


# Formant synthesis: a glottal pulse train at F0 through a cascade of Klatt resonators.
VOWELS = {"ah": (730, 1090, 2440), "ee": (270, 2290, 3010), "oo": (300, 870, 2240)}  # male F1-F3, Hz
SCHWA = np.array([500, 1500, 2500])


def _resonate(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    c = -np.exp(-2 * np.pi * bw / SR)
    b = 2 * np.exp(-np.pi * bw / SR) * np.cos(2 * np.pi * freq / SR)
    return lfilter([1 - b - c], [1, -b, -c], x)


def _vowel(rng, vowel: str, f0: float, seconds: float, scale: float = 1.0, centre: float = 0.0,
           voicing: float = 1.0, breath: float = 0.0) -> np.ndarray:
    """One sustained vowel: F0 with declination and vibrato; formants scaled for the speaker's size.

    The source is `voicing` x the glottal pulse train + `breath` x noise (a whisper is voicing 0)."""
    n = _n(seconds)
    t = np.arange(n) / SR
    f0s = f0 * np.linspace(1.04, 0.96, n) * (1 + 0.015 * np.sin(2 * np.pi * rng.uniform(4, 6) * t + rng.uniform(0, 6.3)))
    cycles = np.floor(np.cumsum(f0s) / SR)
    pulses = np.diff(cycles, prepend=0.0)
    noise = rng.standard_normal(n)
    # Breath noise scaled to the pulses' power (plus the little aspiration every voice has).
    x = voicing * pulses + (0.02 + breath * np.sqrt(np.mean(pulses ** 2))) * noise
    x = lfilter([1.0], [1, -0.96], x)  # glottal roll-off
    formants = (1 - centre) * np.array(VOWELS[vowel]) + centre * SCHWA
    for f, bw in zip([*formants * scale, 3500 * scale], (80, 100, 140, 200)):
        x = _resonate(x, f, bw)
    return _peak_faded(x, 30)


# ---------------------------------------------------------------- generators, one per sub-category

def noise_type(rng, ans, lvl, test):
    n = _n(rng.uniform(2.0, 4.0))
    if ans == "hum":  # a low harmonic buzz: lines in the spectrum, where a rumble is smooth
        f0 = rng.uniform(*[(90, 130), (130, 180), (180, 240)][lvl]) * (1.05 if test else 1.0)
        x = _tone(f0, n, tuple(0.7 ** k for k in range(12)))
    else:  # hard: the cut-offs close in on each other
        cutoff = {"hiss": (4000, 2800, 2000), "rumble": (300, 500, 800)}[ans][lvl] * rng.uniform(0.9, 1.1)
        cutoff *= (0.9 if ans == "hiss" else 1.1) if test else 1.0
        x = _filtered_noise(rng, n, cutoff, "highpass" if ans == "hiss" else "lowpass")
    words = {"hiss": "A high, airy hiss of noise.", "rumble": "A deep, smooth rumble of noise.",
             "hum": "A low buzzing hum with a clear pitch."}
    return _peak_faded(x, 30), words[ans]


def sound_event(rng, ans, lvl, test):
    dur = rng.uniform(2.5, 4.0)
    n = _n(dur)
    centre = rng.uniform(700, 1600) * (1.1 if test else 1.0)
    if ans == "a noise burst":  # band-limited noise around the centre, about an octave wide
        band = sorted([centre / 1.5, centre * 1.5])
        x = _filtered_noise(rng, n, band, "bandpass")
    else:  # the siren wails around the centre; hard: a shallow wail close to a steady tone
        depth = (0.5, 0.3, 0.15)[lvl] if ans == "a siren" else 0.0  # octaves
        t = np.arange(n) / SR
        x = _tone(centre * 2 ** (depth * np.sin(2 * np.pi * rng.uniform(0.6, 1.5) * t + rng.uniform(0, 6.3))), n,
                  (1.0, 0.3))
    words = {"a steady tone": "One tone that holds the same pitch.",
             "a siren": "A tone that wails up and down in pitch.",
             "a noise burst": "A rushing burst of noise with no clear pitch."}
    return _peak_faded(x, 20), words[ans]


def tone_pitch(rng, ans, lvl, test):
    ranges = {"low": [(400, 550), (500, 700), (650, 850)], "high": [(2600, 3600), (1800, 2600), (1250, 1550)]}
    f = rng.uniform(*ranges[ans][lvl]) * (1.06 if test else 1.0)
    dur = rng.uniform(2.0, 4.0)
    seconds = rng.uniform(1.0, dur - 0.2)
    clip = np.zeros(_n(dur))
    _put(clip, _fade(_tone(f, _n(seconds), (1.0, 0.2)), 20), rng.uniform(0.05, dur - seconds - 0.05))
    return clip, f"A steady tone, {ans} in pitch."


def chord(rng, ans, lvl, test):
    f0 = rng.uniform(220, 440) * (1.1 if test else 1.0)
    # A major or minor triad (hard: a bare fifth); the upper notes are quieter as it gets harder.
    steps = [0] if ans == "a single note" else [[0, 4, 7], [0, 3, 7]][int(rng.integers(2))] if lvl < 2 else [0, 7]
    n = _n(rng.uniform(2.0, 4.0))
    x = sum((1.0 if i == 0 else (1.0, 0.7, 0.5)[lvl]) * _tone(f0 * 2 ** (s / 12), n, (1.0, 0.5, 0.33, 0.25, 0.2))
            for i, s in enumerate(steps))
    words = {"a single note": "Only one note sounds at a time.",
             "a chord": f"{NUM[len(steps)].capitalize()} notes sound together."}
    return _peak_faded(x, 20), words[ans]


def melody_direction(rng, ans, lvl, test):
    notes = int(rng.integers(3, 6))
    step = rng.uniform(*[(4, 6), (2.5, 3.5), (1.5, 2)][lvl]) * (1 if ans == "ascending" else -1)
    centre = np.exp(rng.uniform(np.log(800), np.log(1600))) * (1.12 if test else 1.0)
    freqs = centre * 2 ** ((np.arange(notes) - (notes - 1) / 2) * step / 12)
    note = rng.uniform(0.3, 0.5) * (0.85 if test else 1.0)
    gap = rng.uniform(0.03, 0.08)
    span = notes * (note + gap)
    dur = min(MAX_SECONDS, max(2.0, span + rng.uniform(0.2, 1.0)))
    clip, t = np.zeros(_n(dur)), rng.uniform(0.05, dur - span)
    decay = np.exp(-np.arange(_n(note)) / SR / 0.35)
    for f in freqs:
        _put(clip, _fade(_tone(f, _n(note), (1.0, 0.4, 0.2)) * decay, 8), t)
        t += note + gap
    way = "higher" if ans == "ascending" else "lower"
    return clip, f"{NUM[notes].capitalize()} notes, each {way} than the one before."


def timbre(rng, ans, lvl, test):
    f0 = rng.uniform(280, 520) * (1.1 if test else 1.0)  # under an octave: spacing tells square from saw
    rolloff = (1.0, 1.2, 1.5)[lvl]  # hard: weaker overtones
    dur = rng.uniform(2.0, 4.0)
    seconds = rng.uniform(1.0, dur - 0.2)
    clip = np.zeros(_n(dur))
    _put(clip, _fade(_wave(ans, f0, _n(seconds), rolloff), 20), rng.uniform(0.05, dur - seconds - 0.05))
    words = {"sine wave": "A smooth pure tone with no overtones.",
             "square wave": "A hollow tone with only odd overtones.",
             "sawtooth wave": "A bright buzzy tone with every overtone."}
    return clip, words[ans]


def _voice(rng, female: bool, lvl: int, test: bool) -> tuple[float, float]:
    """(F0, formant scale) of a random male-like or female-like speaker."""
    ranges = [(200, 250), (175, 210), (160, 180)] if female else [(85, 120), (105, 135), (125, 145)]
    f0 = rng.uniform(*ranges[lvl]) * (1.05 if test else 1.0)
    scale = rng.uniform(1.12, 1.2) if female else rng.uniform(0.95, 1.03)
    return f0, (rng.uniform(0.95, 1.2) if lvl == 2 else scale)  # hard: F0 is the only cue


def vowel(rng, ans, lvl, test):
    f0, scale = _voice(rng, bool(rng.integers(2)), lvl, test)
    dur = rng.uniform(2.0, 4.0)
    seconds = rng.uniform(0.8, min(2.0, dur - 0.2))
    clip = np.zeros(_n(dur))
    x = _vowel(rng, ans, f0, seconds, scale * (1.05 if test else 1.0), centre=(0.0, 0.15, 0.3)[lvl])
    _put(clip, x, rng.uniform(0.05, dur - seconds - 0.05))
    words = {"ah": "High first formant, open mouth: ah.", "ee": "Very high second formant: ee.",
             "oo": "Both formants low, rounded lips: oo."}
    return clip, words[ans]


def _syllables(rng, voices: list[tuple[float, float]], test: bool) -> np.ndarray:
    """A few syllables of one vowel with pauses; every voice speaks at least one of them."""
    count = int(rng.integers(3, 6))
    lens = rng.uniform(0.25, 0.45, size=count) * (0.9 if test else 1.0)
    pauses = rng.uniform(0.08, 0.2, size=count)
    dur = min(MAX_SECONDS, max(2.0, (lens + pauses).sum() + 0.2))
    clip, t = np.zeros(_n(dur)), rng.uniform(0.05, dur - (lens + pauses).sum() + 0.05)
    order, vowel = rng.permutation(count) % len(voices), str(rng.choice(list(VOWELS)))
    for i in range(count):
        f0, scale = voices[order[i]]
        _put(clip, _vowel(rng, vowel, f0 * rng.uniform(0.98, 1.02), lens[i], scale), t)
        t += lens[i] + pauses[i]
    return clip


def voice_pitch(rng, ans, lvl, test):
    clip = _syllables(rng, [_voice(rng, ans == "female-like", lvl, test)], test)
    words = {"male-like": "The voice pitch is low, like a man's.",
             "female-like": "The voice pitch is high, like a woman's."}
    return clip, words[ans]


def phonation(rng, ans, lvl, test):
    f0, scale = _voice(rng, bool(rng.integers(2)), 0, test)
    dur = rng.uniform(2.0, 4.0)
    seconds = rng.uniform(0.8, min(2.0, dur - 0.2))
    # Whispered: breath noise through the same vocal tract, no pitch. Harder: more breath in the voiced
    # vowel and a trace of voicing in the whisper.
    breath = (0.0, 0.3, 0.6)[lvl] if ans == "voiced" else 1.0
    voicing = 1.0 if ans == "voiced" else (0.0, 0.1, 0.2)[lvl]
    clip = np.zeros(_n(dur))
    x = _vowel(rng, str(rng.choice(list(VOWELS))), f0, seconds, scale, voicing=voicing, breath=breath)
    _put(clip, x, rng.uniform(0.05, dur - seconds - 0.05))
    words = {"voiced": "A clear vowel with a steady voice pitch.", "whispered": "A breathy whisper with no voice pitch."}
    return clip, words[ans]


# ---------------------------------------------------------------- the table

# name: (task, category, generator, answers, train phrasings, held-out test phrasings)
SUBS = {
    "noise_type": ("sound", "sound texture", noise_type, ["hiss", "rumble", "hum"], [
        "What kind of noise is this?",
        "Is this sound a hiss, a rumble or a hum?",
        "Which word best describes this noise?",
    ], [
        "How would you characterise the texture of this noise?",
        "The recording contains which type of noise?",
    ]),
    "sound_event": ("sound", "sound events", sound_event, ["a steady tone", "a siren", "a noise burst"], [
        "What kind of sound event is this?",
        "Which of these sounds do you hear?",
        "What is making this sound?",
    ], [
        "Identify the sound in the recording.",
        "Which best describes the sound event in this clip?",
    ]),
    "tone_pitch": ("sound", "acoustic perception", tone_pitch, ["high", "low"], [
        "Is the tone high or low in pitch?",
        "What is the pitch of the tone?",
        "Does the tone sound high-pitched or low-pitched?",
    ], [
        "How would you describe the pitch of this sound?",
        "Is the sound a high note or a low note?",
    ]),
    "chord": ("music", "harmony", chord, ["a single note", "a chord"], [
        "Is this a single note or a chord?",
        "Does one note sound, or several at once?",
        "How many notes are played at the same time: one, or a chord?",
    ], [
        "Is the music here one note or a chord?",
        "Do you hear a chord or a single note?",
    ]),
    "melody_direction": ("music", "melody", melody_direction, ["ascending", "descending"], [
        "Does the melody go up or down?",
        "In which direction does the sequence of notes move?",
        "Is the melody ascending or descending?",
    ], [
        "How does the pitch of successive notes change?",
        "Which way does this tune move in pitch?",
    ]),
    "timbre": ("music", "timbre", timbre, ["sine wave", "square wave", "sawtooth wave"], [
        "Which waveform best describes the timbre of the note?",
        "What kind of waveform does this note sound like?",
        "Which wave shape produces this sound?",
    ], [
        "The tone colour of this note matches which waveform?",
        "Judging by its timbre, which waveform is playing?",
    ]),
    "vowel": ("speech", "phonetics", vowel, ["ah", "ee", "oo"], [
        "Which vowel sound does the speaker say?",
        "What vowel is being spoken?",
        "Which vowel do you hear?",
    ], [
        "Identify the vowel the voice produces.",
        "The speaker holds which vowel sound?",
    ]),
    "voice_pitch": ("speech", "speaker attributes", voice_pitch, ["male-like", "female-like"], [
        "Does the voice sound male-like or female-like?",
        "Judging by its pitch, is the voice male-like or female-like?",
        "What kind of voice is speaking, by pitch?",
    ], [
        "Based on how high the voice is, which describes the speaker?",
        "Which best describes the pitch of this speaker's voice?",
    ]),
    "phonation": ("speech", "voice quality", phonation, ["voiced", "whispered"], [
        "Is the vowel voiced or whispered?",
        "Does the speaker whisper or use their voice?",
        "Is this voice whispered or voiced?",
    ], [
        "How is the vowel produced: voiced or whispered?",
        "Is the speaker whispering?",
    ]),
}
NAMES = list(SUBS)


# ---------------------------------------------------------------- building

def make_item(seed: int, split: str, j: int) -> tuple[Sample, np.ndarray]:
    """Item j of a split, from (seed, split, j) alone."""
    code = SPLITS[split]
    name = NAMES[j % len(NAMES)]
    task, category, gen, answers, train_q, test_q = SUBS[name]
    m = j // len(NAMES)  # this item's index within its sub-category
    cycle, k = divmod(m, len(answers))
    shuffle = np.random.default_rng([seed, code, 1, j % len(NAMES), cycle])  # one per cycle of len(answers) items
    answer, position = answers[shuffle.permutation(len(answers))[k]], int(shuffle.permutation(len(answers))[k])
    lvl = cycle % len(LEVELS)
    rng = np.random.default_rng([seed, code, 0, j])
    test = split == "test"
    clip, reasoning = gen(rng, answer, lvl, test)
    noise = rng.standard_normal(len(clip)) * np.sqrt(np.mean(clip**2)) * 10 ** (-(SNR_DB[lvl] - 3 * test) / 20)
    clip = clip + noise
    clip = (clip * rng.uniform(0.3, 0.9) / np.abs(clip).max()).astype(np.float32)
    assert len(clip) <= MAX_SECONDS * SR, (name, len(clip))
    others = [answers[i] for i in rng.permutation(len(answers)) if answers[i] != answer]
    sample = Sample(
        id=f"synth-{split}-{j:05d}", audio=f"audio/synth-{split}-{j:05d}.wav", question=str(rng.choice(test_q if test else train_q)),
        choices=others[:position] + [answer] + others[position:], answer=answer, task=task,
        category=category, sub_category=name, difficulty=LEVELS[lvl], source="synth", split=split,
        reasoning=reasoning)
    return sample, clip


def build_synth(out: Path, n_train: int, n_test: int, seed: int) -> dict:
    """Write out/train and out/test as prepared datasets; return each split's summary."""
    if n_train < 0 or n_test < 0 or seed < 0:
        raise UserError(f"synth: --train, --test and --seed must be >= 0 (got {n_train}, {n_test}, {seed})")
    summaries = {}
    for split, n in (("train", n_train), ("test", n_test)):
        params = {"version": VERSION, "seed": seed, "split": split, "n": n}
        with DatasetWriter(Path(out) / split, builder="synth", params=params) as writer:
            for j in range(n):
                writer.add(*make_item(seed, split, j))
            summaries[split] = writer.summary()
    return summaries
