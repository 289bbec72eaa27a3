"""Embedded synthetic language-modelling corpora, generated as token ids.

Two seeded corpora stand in for real text in the default pipeline and the
tests (no tokenizer, no download). Each context is `int32 [T]` with the BOS
token 0 at position 0 and ordinary tokens 1 … V−1 after it.

`ProseCorpus` (Pile-like). Ordinary tokens have a Zipf–Mandelbrot unigram
distribution p_u(r) ∝ (r + 2.7)^−α over ranks r = 1 … V−1, ranks assigned to
ids by a seeded permutation. Each token a (BOS included) has S successors
drawn i.i.d. from p_u with weights w_j ∝ 1/j, so the true bigram is
P(b | a) = (1 − λ) Σ_j w_j [succ(a, j) = b] + λ p_u(b). For n = 2, 3, 4 there
are K planted n-grams of tokens drawn uniformly from 1 … V−1. Position t ≥ 1
that is not inside an insertion draws an action:
  * with probability `copy_prob` (when t − 1 ≥ L_min): a repeated span.
    L ~ U{L_min … min(L_max, t − 1)}, s ~ U{1 … t − L}, and x[t : t+L] =
    x[s : s+L] (cut at T) — the source lies wholly before t, so an induction
    head can predict every copied token after the first;
  * else with probability `ngram_prob`: a planted n-gram, n ~ U{2, 3, 4} and
    one of its K n-grams uniformly, written at x[t : t+n] (cut at T);
  * else a bigram step x[t] ~ P(· | x[t−1]).

`MixtureCorpus`: prose and code contexts mixed (a Pile-like corpus that contains
code), for the data-refined prose-vs-code comparison.

`CodeCorpus` (code-like, the rLLC paper's code data). Ids are laid out as
BOS 0, three bracket pairs 1–6 (`( ) [ ] { }` as (1, 2), (3, 4), (5, 6)),
8 punctuation tokens 7–14, `num_keywords` keywords, then identifiers. Each
context draws `num_local` local identifiers from a Zipf law over the global
identifiers. A token class follows the previous class by `CODE_CLASS_MATRIX`
(classes open, close, keyword, punctuation, identifier), with constraints:
open only below `max_depth` and while the remaining positions can still
close it, close only above depth 0, and once depth equals the remaining
positions only closes. So every context has balanced, properly nested
brackets. A close bracket matches the innermost open one; an identifier is a
local one (Zipf over the local set) with probability `local_prob`, else a
global one; keywords and punctuation are Zipfian within their class.

Sampling is chunked: chunk c (4096 contexts) of `sample(seed, n)` draws from
SeedSequence words (corpus seed, len(seed words), seed words…, c), so the
first m contexts do not depend on n, and distinct seeds never share a stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

BOS_ID = 0
_CHUNK = 4096

# Rows: previous class (open, close, keyword, punct, ident, BOS); columns: next class.
CODE_CLASSES = ("open", "close", "keyword", "punct", "ident")
CODE_CLASS_MATRIX = np.array(
  [
    [0.10, 0.15, 0.15, 0.00, 0.60],  # after (
    [0.05, 0.25, 0.10, 0.50, 0.10],  # after )
    [0.20, 0.00, 0.05, 0.05, 0.70],  # after keyword
    [0.10, 0.10, 0.35, 0.05, 0.40],  # after punctuation
    [0.30, 0.20, 0.05, 0.40, 0.05],  # after identifier
    [0.05, 0.00, 0.60, 0.05, 0.30],  # after BOS
  ]
)


def _seed_words(seed: Any) -> list[int]:
  """An int or tuple of ints, or a JAX key (typed or raw uint32), as SeedSequence words."""
  if isinstance(seed, (int, np.integer, tuple, list)):
    words = [int(s) for s in np.atleast_1d(seed)]
    if min(words, default=0) < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    return words
  import jax  # pylint: disable=g-import-not-at-top

  if jax.dtypes.issubdtype(  # pyright: ignore[reportPrivateImportUsage]  (public jax API)
    seed.dtype, jax.dtypes.prng_key
  ):
    seed = jax.random.key_data(seed)
  return [int(w) for w in np.asarray(seed, dtype=np.uint32).ravel()]


def _zipf(n: int, exponent: float, offset: float = 2.7) -> np.ndarray:
  p = (np.arange(1, n + 1) + offset) ** -exponent
  return p / p.sum()


def _check_shape(vocab_size: int, context_length: int, min_vocab: int, name: str):
  if vocab_size < min_vocab:
    raise ValueError(f"{name}: vocab_size must be >= {min_vocab}, got {vocab_size}")
  if context_length < 2:
    raise ValueError(f"{name}: context_length must be >= 2 (BOS + 1 token), got {context_length}")


class _Corpus:
  """Chunked, seeded sampling shared by the corpora."""

  seed: int
  context_length: int

  def _sample_chunk(
    self, rng: np.random.Generator, n: int
  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    raise NotImplementedError

  def iter_chunks(
    self, seed: Any, num_contexts: int, return_masks: bool = False
  ) -> Iterator[np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]]:
    """`sample(seed, num_contexts, return_masks)` in chunks of up to 4096 contexts."""
    if num_contexts < 0:
      raise ValueError(f"num_contexts must be >= 0, got {num_contexts}")
    words = _seed_words(seed)
    for c, start in enumerate(range(0, num_contexts, _CHUNK)):
      rng = np.random.default_rng([self.seed, len(words), *words, c])  # prefix-free
      tokens, masks = self._sample_chunk(rng, min(_CHUNK, num_contexts - start))
      yield (tokens, masks) if return_masks else tokens

  def sample(
    self, seed: Any, num_contexts: int, return_masks: bool = False
  ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """`num_contexts` contexts, int32 [N, T].

    `seed` is an int, a tuple of ints, or a JAX key. With `return_masks`, also
    bool [N, T] masks of the planted structure (see the corpus docstring).
    """
    chunks = list(self.iter_chunks(seed, num_contexts, return_masks=True))
    if not chunks:
      chunks = [self._sample_chunk(np.random.default_rng(0), 0)]
    tokens = np.concatenate([t for t, _ in chunks])
    if not return_masks:
      return tokens
    return tokens, {k: np.concatenate([m[k] for _, m in chunks]) for k in chunks[0][1]}


@dataclasses.dataclass(frozen=True)
class ProseCorpus(_Corpus):
  """Zipfian bigram text with planted n-grams and repeated spans.

  Masks from `sample(..., return_masks=True)`: 'ngram' marks the 2nd … nth
  token of each planted n-gram, 'copy' the 2nd … Lth token of each repeated
  span (the positions the planted structure makes predictable).
  """

  vocab_size: int = 512
  context_length: int = 64
  seed: int = 0
  zipf_exponent: float = 1.0
  num_successors: int = 8
  unigram_mix: float = 0.2  # λ: bigram steps fall back to p_u
  num_ngrams: int = 16  # K planted n-grams for each n in (2, 3, 4)
  ngram_prob: float = 0.05
  copy_prob: float = 0.02
  copy_length: tuple[int, int] = (5, 20)

  def __post_init__(self):
    _check_shape(self.vocab_size, self.context_length, 16, "ProseCorpus")
    lo, hi = self.copy_length
    if not 1 <= lo <= hi:
      raise ValueError(f"copy_length must be (lo, hi) with 1 <= lo <= hi, got {self.copy_length}")
    probs = (self.unigram_mix, self.ngram_prob, self.copy_prob)
    if min(probs) < 0 or max(probs) > 1 or self.ngram_prob + self.copy_prob > 1:
      raise ValueError(
        f"unigram_mix, ngram_prob, copy_prob must be probabilities "
        f"(ngram_prob + copy_prob <= 1), got {probs}"
      )
    if self.num_successors < 1 or self.num_ngrams < 1:
      raise ValueError(
        f"num_successors and num_ngrams must be >= 1, got {self.num_successors}, {self.num_ngrams}"
      )
    rng = np.random.default_rng([self.seed, 0x5EED])
    p = np.zeros(self.vocab_size)
    p[1 + rng.permutation(self.vocab_size - 1)] = _zipf(self.vocab_size - 1, self.zipf_exponent)
    w = 1.0 / np.arange(1, self.num_successors + 1)
    succ = rng.choice(self.vocab_size, (self.vocab_size, self.num_successors), p=p)
    grams = {
      n: rng.integers(1, self.vocab_size, (self.num_ngrams, n)).astype(np.int32) for n in (2, 3, 4)
    }
    object.__setattr__(self, "unigram", p)
    object.__setattr__(self, "successors", succ.astype(np.int32))
    object.__setattr__(self, "successor_weights", w / w.sum())
    object.__setattr__(self, "planted_ngrams", grams)

  # Set in __post_init__ (derived from `seed`).
  unigram: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  successors: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  successor_weights: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  planted_ngrams: dict = dataclasses.field(init=False, repr=False, compare=False)

  def bigram_matrix(self) -> np.ndarray:
    """The bigram step's P(b | a), float [V, V] (insertions not included)."""
    V = self.vocab_size
    P = np.zeros((V, V))
    rows = np.repeat(np.arange(V), self.num_successors)
    np.add.at(
      P,
      (rows, self.successors.ravel()),
      (1 - self.unigram_mix) * np.tile(self.successor_weights, V),
    )
    return P + self.unigram_mix * self.unigram[None]

  def _sample_chunk(self, rng, n):
    T, lo, hi = self.context_length, *self.copy_length
    x = np.zeros((n, T), np.int32)
    m_ngram = np.zeros((n, T), bool)
    m_copy = np.zeros((n, T), bool)
    # Draws are made for a whole chunk and cut to n: row i does not depend on n.
    u, uc1, uc2, umix = rng.random((4, _CHUNK, T))[:, :n]
    j_succ = rng.choice(self.num_successors, (_CHUNK, T), p=self.successor_weights)[:n]
    uni = rng.choice(self.vocab_size, (_CHUNK, T), p=self.unigram)[:n].astype(np.int32)
    gram_n = rng.integers(2, 5, (_CHUNK, T))[:n]
    gram_k = rng.integers(0, self.num_ngrams, (_CHUNK, T))[:n]
    grams = np.zeros((3, self.num_ngrams, 4), np.int32)  # padded [n-2, K, 4]
    for g in (2, 3, 4):
      grams[g - 2, :, :g] = self.planted_ngrams[g]
    rows = np.arange(n)
    left = np.zeros(n, np.int64)  # tokens left in the current insertion
    src = np.zeros(n, np.int64)  # copy: next source position; n-gram: -1
    gid = np.zeros((n, 2), np.int64)  # n-gram being written: (n − 2, k)
    off = np.zeros(n, np.int64)  # n-gram: next offset
    for t in range(1, T):
      copying = (left > 0) & (src >= 0)
      gramming = (left > 0) & (src < 0)
      free = left == 0
      L_max = min(hi, t - 1)
      start_copy = free & (u[:, t] < self.copy_prob) & (L_max >= lo)
      start_gram = (
        free
        & ~start_copy
        & (u[:, t] >= self.copy_prob)
        & (u[:, t] < self.copy_prob + self.ngram_prob)
      )
      step = free & ~start_copy & ~start_gram
      # New repeated spans: length and source, then written like continuing copies.
      if start_copy.any():
        L = lo + np.floor(uc1[:, t] * (L_max - lo + 1)).astype(np.int64)
        s = 1 + np.floor(uc2[:, t] * (t - L)).astype(np.int64)
        left = np.where(start_copy, L, left)
        src = np.where(start_copy, s, src)
      new_gram = start_gram
      gid[new_gram] = np.stack([gram_n[new_gram, t] - 2, gram_k[new_gram, t]], -1)
      left = np.where(new_gram, gram_n[:, t], left)
      src = np.where(new_gram, -1, src)
      off = np.where(new_gram, 0, off)
      copying |= start_copy
      gramming |= start_gram
      tok = np.where(
        umix[:, t] < self.unigram_mix, uni[:, t], self.successors[x[:, t - 1], j_succ[:, t]]
      )
      tok = np.where(copying, x[rows, np.maximum(src, 0)], tok)
      tok = np.where(gramming, grams[gid[:, 0], gid[:, 1], np.minimum(off, 3)], tok)
      x[:, t] = np.where(step | copying | gramming, tok, 0)
      m_copy[:, t] = copying & ~start_copy
      m_ngram[:, t] = gramming & ~start_gram
      left = np.where(copying | gramming, left - 1, left)
      src = np.where(copying, src + 1, src)
      off = np.where(gramming, off + 1, off)
    return x, {"ngram": m_ngram, "copy": m_copy}


@dataclasses.dataclass(frozen=True)
class CodeCorpus(_Corpus):
  """Code-like tokens: nested brackets, keywords, punctuation, repeated identifiers.

  Masks from `sample(..., return_masks=True)`: 'close' marks close brackets
  (determined by the innermost open one), 'local' local-identifier tokens.
  """

  vocab_size: int = 512
  context_length: int = 64
  seed: int = 0
  num_keywords: int = 24
  num_local: int = 8  # local identifiers per context
  local_prob: float = 0.8
  max_depth: int = 6
  zipf_exponent: float = 1.0

  NUM_BRACKET_PAIRS = 3
  NUM_PUNCT = 8

  def __post_init__(self):
    min_vocab = 1 + 2 * self.NUM_BRACKET_PAIRS + self.NUM_PUNCT + self.num_keywords + 16
    _check_shape(self.vocab_size, self.context_length, min_vocab, "CodeCorpus")
    if self.num_keywords < 1 or self.num_local < 1 or self.max_depth < 1:
      raise ValueError(
        f"num_keywords, num_local and max_depth must be >= 1, got "
        f"{self.num_keywords}, {self.num_local}, {self.max_depth}"
      )
    if not 0 <= self.local_prob <= 1:
      raise ValueError(f"local_prob must be in [0, 1], got {self.local_prob}")
    rng = np.random.default_rng([self.seed, 0xC0DE])
    first_kw = 1 + 2 * self.NUM_BRACKET_PAIRS + self.NUM_PUNCT
    first_id = first_kw + self.num_keywords
    ids = np.arange(first_id, self.vocab_size)
    object.__setattr__(self, "open_brackets", np.arange(1, first_kw - self.NUM_PUNCT, 2))
    object.__setattr__(self, "close_brackets", np.arange(2, first_kw - self.NUM_PUNCT + 1, 2))
    object.__setattr__(self, "punctuation", np.arange(first_kw - self.NUM_PUNCT, first_kw))
    object.__setattr__(self, "keywords", np.arange(first_kw, first_id))
    object.__setattr__(self, "identifiers", ids[rng.permutation(len(ids))])  # by rank

  open_brackets: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  close_brackets: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  punctuation: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  keywords: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  identifiers: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def _sample_chunk(self, rng, n):
    T, D = self.context_length, self.max_depth
    x = np.zeros((n, T), np.int32)
    m_close = np.zeros((n, T), bool)
    m_local = np.zeros((n, T), bool)
    ids = self.identifiers
    C = _CHUNK  # draws are made for a whole chunk and cut to n: row i does not depend on n
    local = ids[rng.choice(len(ids), (C, self.num_local), p=_zipf(len(ids), self.zipf_exponent))][
      :n
    ]
    u_cls = rng.random((C, T))[:n]
    bracket = rng.choice(self.NUM_BRACKET_PAIRS, (C, T), p=[0.5, 0.3, 0.2])[:n]
    kw = self.keywords[
      rng.choice(self.num_keywords, (C, T), p=_zipf(self.num_keywords, self.zipf_exponent))[:n]
    ]
    punct = self.punctuation[
      rng.choice(self.NUM_PUNCT, (C, T), p=_zipf(self.NUM_PUNCT, self.zipf_exponent))[:n]
    ]
    is_local = rng.random((C, T))[:n] < self.local_prob
    loc = local[
      np.arange(n)[:, None],
      rng.choice(self.num_local, (C, T), p=_zipf(self.num_local, 1.0, 0.0))[:n],
    ]
    glob = ids[rng.choice(len(ids), (C, T), p=_zipf(len(ids), self.zipf_exponent))[:n]]
    rows = np.arange(n)
    stack = np.zeros((n, D + 1), np.int64)
    depth = np.zeros(n, np.int64)
    prev = np.full(n, 5)  # class of the previous token (BOS)
    for t in range(1, T):
      remaining = T - t
      probs = CODE_CLASS_MATRIX[prev].copy()
      can_open = (depth < D) & (depth + 1 <= remaining - 1)
      can_close = depth > 0
      probs[~can_open, 4] += probs[~can_open, 0]
      probs[~can_open, 0] = 0
      probs[~can_close, 4] += probs[~can_close, 1]
      probs[~can_close, 1] = 0
      cls = (u_cls[:, t, None] >= np.cumsum(probs, axis=1)).sum(1).clip(0, 4)
      cls = np.where(depth >= remaining, 1, cls)  # must close now
      opening, closing = cls == 0, cls == 1
      top = stack[rows, np.maximum(depth - 1, 0)]
      tok = np.select(
        [opening, closing, cls == 2, cls == 3],
        [self.open_brackets[bracket[:, t]], self.close_brackets[top], kw[:, t], punct[:, t]],
        np.where(is_local[:, t], loc[:, t], glob[:, t]),
      )
      x[:, t] = tok
      m_close[:, t] = closing
      m_local[:, t] = (cls == 4) & is_local[:, t]
      stack[rows, depth] = np.where(opening, bracket[:, t], stack[rows, depth])
      depth = depth + opening - closing
      prev = cls
    return x, {"close": m_close, "local": m_local}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Plug-in entropy (nats) of the non-BOS-position tokens [..., 1:]."""
  counts = np.bincount(np.asarray(tokens)[..., 1:].ravel(), minlength=vocab_size)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def bigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Plug-in conditional entropy H(x_t | x_{t−1}) (nats) within contexts.

  Biased low when V² is not small next to the number of pairs. An independent
  implementation of `lm_metrics.conditional_entropy(*bigram_distribution(...))`
  (via joint and marginal entropies), which the tests check that one against.
  """
  tokens = np.asarray(tokens, np.int64)
  pair = (tokens[..., :-1] * vocab_size + tokens[..., 1:]).ravel()
  _, joint = np.unique(pair, return_counts=True)
  _, prev = np.unique(tokens[..., :-1].ravel(), return_counts=True)
  h_joint = -(joint / joint.sum() * np.log(joint / joint.sum())).sum()
  h_prev = -(prev / prev.sum() * np.log(prev / prev.sum())).sum()
  return float(h_joint - h_prev)


def ngram_counts(tokens: np.ndarray, ngrams: np.ndarray) -> np.ndarray:
  """Occurrences within contexts of each n-gram in `ngrams` [K, n]: int [K]."""
  ngrams = np.asarray(ngrams)
  windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), ngrams.shape[1], axis=-1)
  return np.array([(windows == g).all(-1).sum() for g in ngrams])


def induction_fraction(tokens: np.ndarray, chunk: int = 1024) -> float:
  """Fraction of positions t ≥ 2 that an induction rule predicts.

  The rule: find the most recent j < t − 1 with x[j] = x[t−1] and predict
  x[t] = x[j+1]; positions with no earlier x[t−1] count as misses.
  """
  tokens = np.asarray(tokens)
  T = tokens.shape[-1]
  tokens = tokens.reshape(-1, T)
  if T < 3:
    raise ValueError(f"induction_fraction needs context length >= 3, got {T}")
  earlier = np.tril(np.ones((T, T), bool), -2)  # [t, j]: j < t − 1
  hits = 0
  for start in range(0, len(tokens), chunk):
    x = tokens[start : start + chunk]
    prev = np.concatenate([x[:, :1], x[:, :-1]], 1)  # x[t−1] at t
    match = (x[:, None, :] == prev[:, :, None]) & earlier  # [N, t, j]
    j = T - 1 - np.argmax(match[:, :, ::-1], axis=-1)  # most recent j
    found = match.any(-1)
    nxt = np.take_along_axis(x, np.minimum(j + 1, T - 1), axis=1)
    hits += (found & (nxt == x))[:, 2:].sum()
  return float(hits / (len(tokens) * (T - 2)))


@dataclasses.dataclass(frozen=True)
class MixtureCorpus(_Corpus):
  """Prose and code contexts in one corpus, like the Pile, which contains code: each
  context is a `CodeCorpus` context with probability `code_fraction`, else a
  `ProseCorpus` one (both with this seed). A model trained on it sits near a
  minimum of both components' losses, so the data-refined LLC on `prose` vs `code`
  compares two meaningful quantities (the rLLC paper's Pile-vs-code comparison).

  Masks: 'code' marks the code contexts (every position of them).
  """

  vocab_size: int = 512
  context_length: int = 64
  seed: int = 0
  copy_prob: float = 0.02
  code_fraction: float = 0.5

  def __post_init__(self):
    if not 0 <= self.code_fraction <= 1:
      raise ValueError(f"code_fraction must be in [0, 1], got {self.code_fraction}")
    prose = ProseCorpus(
      vocab_size=self.vocab_size,
      context_length=self.context_length,
      seed=self.seed,
      copy_prob=self.copy_prob,
    )
    code = CodeCorpus(
      vocab_size=self.vocab_size, context_length=self.context_length, seed=self.seed
    )
    object.__setattr__(self, "prose", prose)
    object.__setattr__(self, "code", code)
    object.__setattr__(self, "planted_ngrams", prose.planted_ngrams)

  prose: ProseCorpus = dataclasses.field(init=False, repr=False, compare=False)
  code: CodeCorpus = dataclasses.field(init=False, repr=False, compare=False)
  planted_ngrams: dict = dataclasses.field(init=False, repr=False, compare=False)

  def _sample_chunk(self, rng, n):
    # Both components sample all n rows from their own child streams, so the first m
    # contexts do not depend on n (as for the components); the choice picks per row.
    rng_mix, rng_prose, rng_code = rng.spawn(3)
    is_code = rng_mix.random(n) < self.code_fraction
    prose, _ = self.prose._sample_chunk(rng_prose, n)
    code, _ = self.code._sample_chunk(rng_code, n)
    x = np.where(is_code[:, None], code, prose).astype(np.int32)
    return x, {"code": np.repeat(is_code[:, None], self.context_length, axis=1)}


CORPORA = {"prose": ProseCorpus, "code": CodeCorpus, "mixture": MixtureCorpus}


def corpus_from_config(config, corpus: str | None = None):
  """The embedded corpus (`config.data.corpus` or `corpus`) at the model's vocabulary
  and context sizes, seeded by `config.data.corpus_seed`."""
  name = corpus or config.data.corpus
  if name not in CORPORA:
    raise ValueError(f"unknown synthetic corpus {name!r}; choose from {sorted(CORPORA)}")
  extra = {}
  if name in ("prose", "mixture") and config.data.get("copy_prob") is not None:
    extra["copy_prob"] = config.data.copy_prob  # repeated spans: the induction incentive
  if name == "mixture" and config.data.get("code_fraction") is not None:
    extra["code_fraction"] = config.data.code_fraction
  return CORPORA[name](
    vocab_size=config.model.vocab_size,
    context_length=config.model.context_length,
    seed=config.data.corpus_seed,
    **extra,
  )
