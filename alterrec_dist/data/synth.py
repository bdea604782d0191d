"""Synthetic session data shaped like Amazon-M2, written in the dataset layout (data/layout.py).

    python -m alterrec_dist.synth --items N --sessions M --out OUT [--seed S]
        [--text-features sbert|random-projection] [--text-dim D] [--overwrite]

The generative story:
- every item belongs to one latent topic (about sqrt(N) topics) and, within it, to one product
  line (about LINE_SIZE items each), and has a Zipf-Mandelbrot popularity whose head matches
  Amazon-M2 (top 1% of items take 11.7% of events, top 10% 44.3%);
- an item's title is its line's brand word, a few words of its topic's word list, the topic's
  product noun, two global words and "by <brand>", so similar text means similar topic (and the same brand the same
  line) means co-occurrence in sessions;
- a session starts in a topic drawn by topic popularity and a line drawn by line popularity within
  it; at each step it switches topic with a small probability (and draws a new line), else switches
  line within the topic with probability LINE_SWITCH, and draws each item by popularity within the
  current line; because a switch redraws from the marginal, every event's item is distributed
  exactly as the popularity;
- so the next item is mostly a line-mate of the last ones: an ID table learns the lines of the
  items it sees often, and for rarely seen items only the title's brand word tells their line.
  That is the gap AlterRec's text network fills (the long tail), while only the ID network can
  learn which items of a line are popular: each is better at something, and fused beats both;
- session lengths (target included) follow a two-geometric mixture fitted to Amazon-M2 task 2:
  p50 4, p90 8, p99 14, max 46, so histories (all but the target) have p50 3, p90 7, p99 13;
- sessions go to train/valid/test 80/10/10; train rows are every prefix -> next item of a train
  session, valid/test rows are history = all but the last item, target = the last item.

Randomness is keyed by fixed-size units of sessions and items (not by the block size), so the
output is a function of (items, sessions, seed, text options) alone, and generation streams in
blocks with memory bounded by a block plus the O(N) item arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from alterrec_dist.data.layout import SPLITS, DatasetWriter
from alterrec_dist.data.sources.tables import Pairs, event_positions


# Zipf-Mandelbrot popularity over the rank fraction x in (0, 1): weight = (x + OFFSET)^-EXPONENT.
# The two constants solve share(top 1%) = 0.117 and share(top 10%) = 0.443 (Amazon-M2 task 2) for
# the continuous curve; as a function of x rather than of the rank, the shares do not depend on N.
ZIPF_EXPONENT = 0.85055
ZIPF_OFFSET = 0.0087152

# Session length = MIN_SESSION_LEN + a geometric draw from a two-component mixture, fitted by
# maximum likelihood to the 69,378 Amazon-M2 task-2 test sessions (prev_items + next_item).
MIN_SESSION_LEN = 3
MAX_SESSION_LEN = 46
SHORT_SHARE = 0.9642       # share of sessions drawn from the fast-decaying component
SHORT_RATIO = 0.6293       # P(length > k + 1 | length > k) in that component
LONG_RATIO = 0.8389        # the heavy tail that produces the occasional 20-45 item session

TOPIC_SWITCH = 0.2         # per-step probability of leaving the current topic
LINE_SWITCH = 0.3          # per-step probability of leaving the current line within the topic
LINE_SIZE = 5              # mean items per product line (lines per topic = topic size / LINE_SIZE)
SPLIT_CUTS = (0.8, 0.9)    # train < 0.8 <= valid < 0.9 <= test
MAX_TOPICS = 1000
WORDS_PER_TOPIC = 10       # each topic's word list
VOCAB_PER_TOPIC = 6        # vocabulary = 6 words per topic: word lists of different topics overlap a little
TITLE_TOPIC_WORDS = (2, 4)  # topic words per title, inclusive
TOPIC_DIM = 32             # latent topic vectors behind the random-projection text features
FEATURE_NOISE = 1.0        # norm of the per-item noise next to the unit topic direction
LINE_FEATURE = 0.7         # norm of the line's direction next to it (same-topic cosine ~0.4, same-line ~0.6)
SBERT_MAX_ITEMS = 100_000  # above this the default is random-projection: SBERT on CPU is ~1k titles/s
TEXT_DIM = 384  # random-projection feature size by default: MiniLM's, as the sbert features have
BLOCK_SESSIONS = 100_000  # sessions handed to the writer at a time by default

SESSIONS_PER_SEED = 4096   # sessions drawn from one RNG; a block is a whole number of these
ITEMS_PER_SEED = 65_536    # items (titles, feature noise) drawn from one RNG
STREAM_CATALOG, STREAM_SESSIONS, STREAM_TITLES, STREAM_FEATURES = range(4)

CONSONANTS = list("bcdfgklmnprstvz")
VOWELS = list("aeiou")
GLOBAL_WORDS = [
    "new", "premium", "classic", "compact", "portable", "deluxe", "basic", "pro", "mini", "large",
    "small", "black", "white", "silver", "blue", "red", "green", "grey", "wooden", "steel",
    "2-pack", "3-pack", "set", "kit", "edition", "original", "plus", "max", "lite", "ultra",
]
PRODUCT_NOUNS = [
    "lamp", "cable", "charger", "mug", "bottle", "backpack", "headphones", "speaker", "keyboard",
    "mouse", "notebook", "pen", "towel", "pillow", "blanket", "jacket", "shirt", "sneakers",
    "watch", "wallet", "knife", "pan", "kettle", "blender", "toaster", "drill", "screwdriver",
    "hammer", "glove", "helmet", "tent", "lantern", "candle", "vase", "frame", "mirror", "rug",
    "chair", "desk", "shelf", "toy", "puzzle", "book", "game", "brush", "shampoo", "soap", "cream",
]


@dataclass
class Catalog:
    """Everything per item and per topic that sessions, titles and features are drawn from."""
    topic: np.ndarray            # int32[N]: each item's topic
    line: np.ndarray             # int32[N]: each item's product line; a topic's lines are consecutive numbers
    weight: np.ndarray           # float64[N]: popularity, sums to 1
    by_line: np.ndarray          # int32[N]: item indices grouped by line (so also by topic)
    cum_weight: np.ndarray       # float64[N]: running popularity mass along by_line
    line_start: np.ndarray       # int64[L+1]: line l is by_line[line_start[l]:line_start[l+1]]
    line_mass: np.ndarray        # float64[L+1]: popularity mass before line l along by_line
    topic_lines: np.ndarray      # int64[T+1]: topic t owns lines topic_lines[t]..topic_lines[t+1]-1
    topic_words: np.ndarray      # int64[T, WORDS_PER_TOPIC]: vocabulary indices
    topic_noun: np.ndarray       # int64[T]: PRODUCT_NOUNS index
    line_word: np.ndarray        # int64[L]: each line's brand word, a vocabulary index no other line uses
    vocab: list[str]

    @property
    def num_items(self) -> int:
        return len(self.topic)

    @property
    def num_topics(self) -> int:
        return len(self.topic_noun)

    @property
    def num_lines(self) -> int:
        return len(self.line_word)

    @property
    def topic_mass(self) -> np.ndarray:
        """float64[T+1]: popularity mass before topic t along by_line."""
        return self.line_mass[self.topic_lines]


def num_topics(num_items: int) -> int:
    return int(min(MAX_TOPICS, max(1, round(math.sqrt(num_items)))))


def zipf_weights(n: int) -> np.ndarray:
    """Popularity by rank (0 = most popular), normalised to sum to 1."""
    x = (np.arange(n, dtype=np.float64) + 0.5) / n
    w = (x + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    return w / w.sum()


def pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct pronounceable made-up words (2-3 syllables, maybe a final consonant): brand-like
    tokens; titles that share them get close SBERT embeddings."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words: dict[str, None] = {}  # insertion-ordered set: the output order is deterministic
    while len(words) < n:
        k = n - len(words)
        parts = rng.integers(len(syllables), size=(k, 3))
        n_syll = rng.integers(2, 4, size=k)
        tails = rng.integers(len(CONSONANTS) + 1, size=k)  # == len(CONSONANTS): no final consonant
        for p, s, t in zip(parts.tolist(), n_syll.tolist(), tails.tolist()):
            words["".join(syllables[j] for j in p[:s]) + (CONSONANTS[t] if t < len(CONSONANTS) else "")] = None
    return list(words)


def make_catalog(num_items: int, seed: int) -> Catalog:
    rng = np.random.default_rng([seed, STREAM_CATALOG])
    T = num_topics(num_items)
    topic = rng.integers(T, size=num_items).astype(np.int32)
    # A random rank per item: item_idx carries no popularity, so row shards of the item tables
    # get a fair share of head items.
    weight = zipf_weights(num_items)[rng.permutation(num_items)]
    lines_per_topic = np.maximum(1, np.round(np.bincount(topic, minlength=T) / LINE_SIZE)).astype(np.int64)
    topic_lines = np.concatenate([[0], np.cumsum(lines_per_topic)])
    L = int(topic_lines[-1])
    # each item to a uniformly drawn line of its topic
    line = (topic_lines[topic] + (rng.random(num_items) * lines_per_topic[topic]).astype(np.int64)).astype(np.int32)
    by_line = np.argsort(line, kind="stable").astype(np.int32)
    topic_vocab = max(T * VOCAB_PER_TOPIC, WORDS_PER_TOPIC)  # one topic (N <= 2) still has a word list
    vocab = pseudo_words(rng, topic_vocab + L)  # topic words first, then one brand word per line
    topic_words = np.stack([rng.choice(topic_vocab, WORDS_PER_TOPIC, replace=False) for _ in range(T)])
    return Catalog(
        topic=topic, line=line, weight=weight, by_line=by_line, cum_weight=np.cumsum(weight[by_line]),
        line_start=np.searchsorted(line[by_line], np.arange(L + 1)),
        line_mass=np.concatenate([[0.0], np.cumsum(np.bincount(line, weights=weight, minlength=L))]),
        topic_lines=topic_lines, topic_words=topic_words, topic_noun=rng.integers(len(PRODUCT_NOUNS), size=T),
        line_word=topic_vocab + np.arange(L), vocab=vocab,
    )


# -- sessions ------------------------------------------------------------------------------------
def session_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    ratio = np.where(rng.random(n) < SHORT_SHARE, SHORT_RATIO, LONG_RATIO)
    extra = rng.geometric(1.0 - ratio) - 1
    return np.minimum(MIN_SESSION_LEN + extra, MAX_SESSION_LEN).astype(np.int64)


def draw_topics(cat: Catalog, rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.searchsorted(cat.topic_mass, rng.random(n) * cat.topic_mass[-1], side="right") - 1
    return np.clip(t, 0, cat.num_topics - 1)


def draw_lines(cat: Catalog, rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
    """One line per entry of `topics`, by popularity within that topic (one binary search; a line that
    drew no items has no mass, so it is never drawn)."""
    lo, hi = cat.topic_mass[topics], cat.topic_mass[topics + 1]
    line = np.searchsorted(cat.line_mass, lo + rng.random(len(topics)) * (hi - lo), side="right") - 1
    # float rounding can land a hair outside the topic's range: keep it inside
    return np.clip(line, cat.topic_lines[topics], cat.topic_lines[topics + 1] - 1)


def draw_items(cat: Catalog, rng: np.random.Generator, lines: np.ndarray) -> np.ndarray:
    """One item per entry of `lines`, by popularity within that line (one binary search)."""
    lo, hi = cat.line_mass[lines], cat.line_mass[lines + 1]
    pos = np.searchsorted(cat.cum_weight, lo + rng.random(len(lines)) * (hi - lo), side="right")
    pos = np.clip(pos, cat.line_start[lines], cat.line_start[lines + 1] - 1)
    return cat.by_line[pos]


def draw_sessions(cat: Catalog, seed: int, unit: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sessions unit*SESSIONS_PER_SEED .. +n: (lengths, items flat int32, split index per session)."""
    rng = np.random.default_rng([seed, STREAM_SESSIONS, unit])
    split = np.searchsorted(np.array(SPLIT_CUTS), rng.random(n), side="right")
    lengths = session_lengths(rng, n)
    total = int(lengths.sum())
    topic_switch = rng.random(total) < TOPIC_SWITCH
    topic_switch[np.cumsum(lengths) - lengths] = True  # every session opens with a fresh topic
    line_switch = topic_switch | (rng.random(total) < LINE_SWITCH)  # a new topic means a new line
    positions = np.arange(total)
    topic_at = np.zeros(total, dtype=np.int64)
    topic_at[topic_switch] = draw_topics(cat, rng, int(topic_switch.sum()))
    topic_at = topic_at[np.maximum.accumulate(np.where(topic_switch, positions, 0))]
    line_at = np.zeros(total, dtype=np.int64)
    line_at[line_switch] = draw_lines(cat, rng, topic_at[line_switch])
    items = draw_items(cat, rng, line_at[np.maximum.accumulate(np.where(line_switch, positions, 0))])
    return lengths, items.astype(np.int32), split


def write_session_block(writer: DatasetWriter, lengths: np.ndarray, items: np.ndarray, split: np.ndarray,
                        first_session: int) -> None:
    """Train rows: every prefix of a training session -> the item after it; valid/test rows: all
    but the last item -> the last item. The same row-making as `prepare` (sources.tables.Pairs)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    position, length = event_positions(offsets)
    event_split = np.repeat(split, lengths)
    session = pa.array(np.arange(first_session, first_session + len(lengths), dtype=np.int64)).cast(pa.string())
    for s, name in enumerate(SPLITS):
        row_events = (position >= 1) if name == "train" else (position == length - 1)
        pairs = Pairs.where(items, offsets, (event_split == s) & row_events, session=session)
        for history, target, _, session_ids in pairs.blocks():
            writer.add_sessions(name, history, target, session=session_ids)


def write_sessions(writer: DatasetWriter, cat: Catalog, seed: int, num_sessions: int, block_sessions: int,
                   progress: bool) -> None:
    """Draw sessions unit by unit and hand them to the writer a block (several units) at a time."""
    units_per_block = max(1, block_sessions // SESSIONS_PER_SEED)
    num_units = -(-num_sessions // SESSIONS_PER_SEED)
    with tqdm(total=num_sessions, unit="session", desc="sessions", disable=not progress) as bar:
        for first_unit in range(0, num_units, units_per_block):
            units = range(first_unit, min(first_unit + units_per_block, num_units))
            drawn = [draw_sessions(cat, seed, u, min(SESSIONS_PER_SEED, num_sessions - u * SESSIONS_PER_SEED))
                     for u in units]
            lengths, items, split = (np.concatenate(parts) for parts in zip(*drawn))
            write_session_block(writer, lengths, items, split, first_unit * SESSIONS_PER_SEED)
            bar.update(len(lengths))


# -- items: ids, titles, text features -----------------------------------------------------------
def item_ids(n: int) -> pa.Array:
    """P0000000, P0000001, ...: built in Arrow, so 10M ids cost no Python objects."""
    digits = pc.utf8_lpad(pa.array(np.arange(n)).cast(pa.string()), len(str(max(n - 1, 0))), "0")
    return pc.binary_join_element_wise("P", digits, "")


def item_titles(cat: Catalog, seed: int, unit: int) -> list[str]:
    """Titles of items unit*ITEMS_PER_SEED ..: the line's brand word, 2-4 distinct topic words, the topic's
    noun, 2 global words, "by" and the brand again (as sellers write them: the brand twice makes it
    as visible to a sentence encoder as the topic words are)."""
    rng = np.random.default_rng([seed, STREAM_TITLES, unit])
    topic = cat.topic[unit * ITEMS_PER_SEED:(unit + 1) * ITEMS_PER_SEED]
    brand = cat.line_word[cat.line[unit * ITEMS_PER_SEED:(unit + 1) * ITEMS_PER_SEED]].tolist()
    n, most = len(topic), TITLE_TOPIC_WORDS[1]
    pick = np.argsort(rng.random((n, WORDS_PER_TOPIC)), axis=1)[:, :most]
    words = cat.topic_words[topic[:, None], pick].tolist()
    count = rng.integers(TITLE_TOPIC_WORDS[0], most + 1, size=n).tolist()
    extra = rng.integers(len(GLOBAL_WORDS), size=(n, 2)).tolist()
    noun = cat.topic_noun[topic].tolist()
    v = cat.vocab
    return [" ".join([v[b]] + [v[j] for j in w[:c]] + [PRODUCT_NOUNS[p], GLOBAL_WORDS[e[0]], GLOBAL_WORDS[e[1]], "by", v[b]])
            for b, w, c, e, p in zip(brand, words, count, extra, noun)]


def all_titles(cat: Catalog, seed: int, progress: bool) -> pa.ChunkedArray:
    units = range(-(-cat.num_items // ITEMS_PER_SEED))
    chunks = [pa.array(item_titles(cat, seed, u), type=pa.string())
              for u in tqdm(units, desc="titles", unit="block", disable=not progress)]
    return pa.chunked_array(chunks, type=pa.string())


def random_projection_features(cat: Catalog, seed: int, dim: int, progress: bool):
    """Blocks of normalize(P @ topic_vec[topic_i] + LINE_FEATURE * Q @ line_vec[line_i] + noise_i), each
    projected vector of unit norm: text features with topic and line structure and no SBERT run.
    Yields float16 blocks of ITEMS_PER_SEED rows in item order."""
    rng = np.random.default_rng([seed, STREAM_FEATURES])

    def unit_rows(m: np.ndarray) -> np.ndarray:
        return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)

    topic_vecs = rng.standard_normal((cat.num_topics, TOPIC_DIM))
    projection = rng.standard_normal((TOPIC_DIM, dim)) / math.sqrt(TOPIC_DIM)
    centers = unit_rows(topic_vecs @ projection)
    # lines live in TOPIC_DIM dimensions too (a line x dim matrix would not fit at catalog scale)
    line_vecs = rng.standard_normal((cat.num_lines, TOPIC_DIM)).astype(np.float32)
    line_projection = (rng.standard_normal((TOPIC_DIM, dim)) / math.sqrt(TOPIC_DIM)).astype(np.float32)
    units = range(-(-cat.num_items // ITEMS_PER_SEED))
    for u in tqdm(units, desc="features", unit="block", disable=not progress):
        topic = cat.topic[u * ITEMS_PER_SEED:(u + 1) * ITEMS_PER_SEED]
        line = unit_rows(line_vecs[cat.line[u * ITEMS_PER_SEED:(u + 1) * ITEMS_PER_SEED]] @ line_projection)
        noise = np.random.default_rng([seed, STREAM_FEATURES, u]).standard_normal((len(topic), dim), dtype=np.float32)
        block = centers[topic] + line * np.float32(LINE_FEATURE) + noise * np.float32(FEATURE_NOISE / math.sqrt(dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield block.astype(np.float16)


def write_synth(out: str | Path, *, items: int, sessions: int, seed: int = 0,
                text_features: str = "random-projection", text_dim: int = TEXT_DIM, overwrite: bool = False,
                block_sessions: int = BLOCK_SESSIONS, progress: bool = True, command: list[str] | None = None) -> Path:
    """Generate and commit a synthetic dataset at `out`; returns the committed path."""
    cat = make_catalog(items, seed)
    with DatasetWriter(out, overwrite=overwrite) as writer:
        titles = all_titles(cat, seed, progress)
        writer.set_items(item_ids(items), titles)
        if text_features == "sbert":
            from alterrec_dist.data.text_features import text_model_name, write_text_features  # heavy: torch
            write_text_features(writer, titles.to_pylist(), progress=progress)
            text_model = text_model_name(None)
        else:
            for block in random_projection_features(cat, seed, text_dim, progress):
                writer.add_text_features(block)
            text_model = "random-projection"
        write_sessions(writer, cat, seed, sessions, block_sessions, progress)
        params = {"items": items, "sessions": sessions, "seed": seed, "text_features": text_features,
                  "topics": cat.num_topics, "topic_switch": TOPIC_SWITCH, "lines": cat.num_lines,
                  "line_switch": LINE_SWITCH,
                  "zipf": {"exponent": ZIPF_EXPONENT, "offset": ZIPF_OFFSET}}
        return writer.commit(source={"kind": "synth", **params}, text_model=text_model,
                             command=command)
