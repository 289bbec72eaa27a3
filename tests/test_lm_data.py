"""Language-modelling data: synthetic corpora, tokenizer, array_record TFDS dataset."""

import json
import pathlib

import jax
import numpy as np
import pytest

from devinterp_jax.data import documents, lm_dataset
from devinterp_jax.data import synthetic_text as st
from devinterp_jax.data import tokenizer as tokenizer_lib

V, T = 512, 64


@pytest.fixture(scope="module")
def prose():
  corpus = st.ProseCorpus(vocab_size=V, context_length=T, seed=0)
  tokens, masks = corpus.sample(1, 4000, return_masks=True)
  return corpus, tokens, masks


@pytest.fixture(scope="module")
def code():
  corpus = st.CodeCorpus(vocab_size=V, context_length=T, seed=0)
  tokens, masks = corpus.sample(1, 4000, return_masks=True)
  return corpus, tokens, masks


# ----------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("cls", [st.ProseCorpus, st.CodeCorpus, st.MixtureCorpus])
def test_corpora_are_seeded_and_chunk_independent(cls):
  corpus = cls(vocab_size=V, context_length=T, seed=0)
  a = corpus.sample(3, 50)
  assert a.shape == (50, T) and a.dtype == np.int32
  np.testing.assert_array_equal(a, corpus.sample(3, 50))
  np.testing.assert_array_equal(a, corpus.sample(3, 5000)[:50])  # crosses a chunk
  assert (a != corpus.sample(4, 50)).mean() > 0.5
  assert (a != cls(vocab_size=V, context_length=T, seed=1).sample(3, 50)).mean() > 0.5
  np.testing.assert_array_equal(
    corpus.sample(jax.random.key(7), 8), corpus.sample(jax.random.key(7), 8)
  )
  assert corpus == cls(vocab_size=V, context_length=T, seed=0)  # hashable config
  hash(corpus)


@pytest.mark.parametrize("name", ["prose", "code"])
def test_bos_only_at_position_zero(name, request):
  _, tokens, _ = request.getfixturevalue(name)
  assert (tokens[:, 0] == st.BOS_ID).all()
  assert (tokens[:, 1:] > 0).all() and (tokens < V).all()


def test_prose_bigrams_are_informative(prose):
  corpus, tokens, _ = prose
  h1 = st.unigram_entropy(tokens, V)
  h2 = st.bigram_entropy(tokens, V)
  P = corpus.bigram_matrix()
  np.testing.assert_allclose(P.sum(1), 1.0)
  true_h2 = -(corpus.unigram[:, None] * P * np.log(np.where(P > 0, P, 1))).sum()
  assert h2 < 0.7 * h1 and true_h2 < 0.75 * h1, (h1, h2, true_h2)


def test_planted_ngrams_are_far_above_chance(prose):
  corpus, tokens, masks = prose
  p = np.bincount(tokens[:, 1:].ravel(), minlength=V) / tokens[:, 1:].size
  for n, grams in corpus.planted_ngrams.items():
    assert grams.shape == (corpus.num_ngrams, n)
    observed = st.ngram_counts(tokens, grams)
    expected = tokens.shape[0] * (T - n) * np.prod(p[grams], axis=1)
    assert observed.min() > 0 and observed.sum() > 20 * expected.sum(), (n, observed, expected)
  assert 0.02 < masks["ngram"].mean() < 0.2


def test_repeated_spans_make_induction_predictable(prose):
  corpus, tokens, masks = prose
  no_copy = st.ProseCorpus(vocab_size=V, context_length=T, seed=0, copy_prob=0.0)
  base = st.induction_fraction(no_copy.sample(1, 1000))
  with_copies = st.induction_fraction(tokens[:1000])
  assert with_copies > base + 0.08, (base, with_copies)
  assert masks["copy"].mean() > 0.05


def test_code_brackets_balance_and_distribution_differs(prose, code):
  corpus, tokens, masks = code
  pairs = dict(zip(corpus.open_brackets.tolist(), corpus.close_brackets.tolist()))
  closers = set(pairs.values())
  for ctx in tokens:
    stack = []
    for tok in ctx.tolist():
      if tok in pairs:
        stack.append(pairs[tok])
      elif tok in closers:
        assert stack and stack.pop() == tok
    assert not stack
  assert masks["close"].mean() > 0.05 and masks["local"].mean() > 0.2
  p_prose = np.bincount(prose[1].ravel(), minlength=V) / prose[1].size
  p_code = np.bincount(tokens.ravel(), minlength=V) / tokens.size
  assert 0.5 * np.abs(p_prose - p_code).sum() > 0.3


def test_mixture_holds_whole_prose_and_code_contexts():
  """Every mixture context is a well-formed code context (balanced brackets) or a
  prose one, in the configured proportion, and the prose n-grams are planted."""
  corpus = st.MixtureCorpus(vocab_size=V, context_length=T, seed=0, code_fraction=0.25)
  tokens, masks = corpus.sample(1, 2000, return_masks=True)
  is_code = masks["code"][:, 0]
  assert abs(is_code.mean() - 0.25) < 0.03 and (masks["code"] == is_code[:, None]).all()
  assert tokens[:, 0].tolist() == [st.BOS_ID] * len(tokens)
  code = corpus.code
  pairs = dict(zip(code.open_brackets.tolist(), code.close_brackets.tolist()))
  depth_ok = []
  for ctx in tokens[is_code][:200]:
    stack, ok = [], True
    for tok in ctx.tolist():
      if tok in pairs:
        stack.append(pairs[tok])
      elif tok in pairs.values():
        ok = ok and bool(stack) and stack.pop() == tok
    depth_ok.append(ok and not stack)
  assert all(depth_ok)
  # Code-only statistics: keywords are far more frequent in code contexts than in prose.
  kw = np.isin(tokens, code.keywords)
  assert kw[is_code].mean() > 3 * kw[~is_code].mean()
  assert corpus.planted_ngrams is corpus.prose.planted_ngrams
  with pytest.raises(ValueError, match="code_fraction"):
    st.MixtureCorpus(code_fraction=1.5)


def test_corpus_bad_inputs():
  with pytest.raises(ValueError, match="vocab_size"):
    st.ProseCorpus(vocab_size=8)
  with pytest.raises(ValueError, match="vocab_size"):
    st.CodeCorpus(vocab_size=40)
  with pytest.raises(ValueError, match="context_length"):
    st.ProseCorpus(context_length=1)
  with pytest.raises(ValueError, match="copy_length"):
    st.ProseCorpus(copy_length=(10, 5))


# ----------------------------------------------------------------------------- tokenizer

DOCS = [
  f"Story {i}: the {w} cat sat on the mat {i % 7} times. Café ü → {w}!"
  for i, w in enumerate(["red", "blue", "green", "tiny", "old"] * 12)
]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_bpe(DOCS, vocab_size=300)


def test_tokenizer_round_trips_and_reserves_bos(tok, tmp_path):
  assert tok.bos_id == 0 and tok.bos_token == tokenizer_lib.DEFAULT_BOS
  assert 257 < tok.vocab_size <= 300
  text = "The tiny cat sat: Café ü → 42 times.\n  Indented."
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.bos_id not in ids
  assert tok.decode(ids) == text
  assert [list(x) for x in tok.encode_batch([text, "x"])] == [list(ids), list(tok.encode("x"))]
  tok.save(tmp_path / "tokenizer.json")
  loaded = tokenizer_lib.load_tokenizer(tmp_path / "tokenizer.json")
  assert loaded.bos_id == 0
  np.testing.assert_array_equal(loaded.encode(text), ids)
  # Training from a file gives the same tokenizer as from its documents.
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
  from_file = tokenizer_lib.train_bpe([tmp_path / "docs.jsonl"], vocab_size=300)
  np.testing.assert_array_equal(from_file.encode(text), ids)


def test_tokenizer_bad_inputs(tok, tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_bpe(DOCS, vocab_size=100)
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.load_tokenizer(tmp_path / "missing.json")
  tok.save(tmp_path / "t.json")
  with pytest.raises(ValueError, match="no BOS token"):
    tokenizer_lib.load_tokenizer(tmp_path / "t.json", bos_token="<nope>")
  with pytest.raises(ValueError, match="texts"):
    tokenizer_lib.train_bpe([3], vocab_size=300)


# ----------------------------------------------------------------------------- dataset


def _write_shards(tmp_path: pathlib.Path) -> list[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  txt, jsonl, parquet = (tmp_path / f"shard.{e}" for e in ("txt", "jsonl", "parquet"))
  txt.write_text("\n\n".join(DOCS[:20]))
  jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[20:45])))
  pq.write_table(pa.table({"text": DOCS[45:]}), parquet)
  return [str(txt), str(jsonl), str(parquet)]


def test_text_dataset_round_trips_and_splits(tok, tmp_path):
  files = _write_shards(tmp_path)
  tok.save(tmp_path / "tok.json")
  opts = dict(separator="\n\n", sgld_fraction=0.25, validation_fraction=0.25, split_seed=3)
  lm_dataset.build_text_dataset(
    "tiny", files, tmp_path / "tok.json", tmp_path / "a", context_length=16, **opts
  )
  docs = [d for f in files for d in documents.read_documents(f, separator="\n\n")]
  assert docs == DOCS
  seen = []
  for split in lm_dataset.SPLITS:
    src = lm_dataset.load_split(tmp_path / "a", "tiny", split)
    got = lm_dataset.load_array(src)
    mine = [d for d in docs if documents.document_split(d, 3, 0.25, 0.25) == split]
    stream = np.concatenate([np.append(tok.encode(d), tok.bos_id) for d in mine])
    k = len(stream) // 15
    want = np.concatenate([np.zeros((k, 1), np.int32), stream[: 15 * k].reshape(k, 15)], 1)
    assert len(mine) >= 5 and k >= 3
    np.testing.assert_array_equal(got, want)
    seen.append(set(mine))
  assert set.union(*seen) == set(DOCS) and sum(map(len, seen)) == len(DOCS)  # a partition
  meta = lm_dataset.dataset_metadata(tmp_path / "a", "tiny")
  assert meta["vocab_size"] == tok.vocab_size and meta["bos_id"] == 0
  # Rebuilt elsewhere: identical.
  lm_dataset.build_text_dataset(
    "tiny", files, tmp_path / "tok.json", tmp_path / "b", context_length=16, **opts
  )
  for split in lm_dataset.SPLITS:
    np.testing.assert_array_equal(
      lm_dataset.load_array(lm_dataset.load_split(tmp_path / "a", "tiny", split)),
      lm_dataset.load_array(lm_dataset.load_split(tmp_path / "b", "tiny", split)),
    )


def test_synthetic_dataset_shares_the_reader(tmp_path):
  corpus = st.ProseCorpus(vocab_size=64, context_length=16, seed=2)
  lm_dataset.build_synthetic_dataset(
    corpus, tmp_path, "prose", {"train": 100, "sgld": 30, "validation": 20}, seed=5
  )
  for i, (split, n) in enumerate([("train", 100), ("sgld", 30), ("validation", 20)]):
    got = lm_dataset.load_array(lm_dataset.load_split(tmp_path, "prose", split))
    np.testing.assert_array_equal(got, corpus.sample((5, i), n))
  assert lm_dataset.dataset_metadata(tmp_path, "prose")["vocab_size"] == 64


def test_batch_at_is_deterministic_and_resumable(tmp_path):
  corpus = st.CodeCorpus(vocab_size=128, context_length=8)
  lm_dataset.build_synthetic_dataset(corpus, tmp_path, "code", {"train": 40})
  data = corpus.sample((0, 0), 40)  # the same contexts in memory
  src = lm_dataset.load_split(tmp_path, "code", "train")
  run = [lm_dataset.batch_at(src, s, 8, seed=1) for s in range(12)]
  assert run[0].shape == (8, 8) and run[0].dtype == np.int32
  for s in (0, 4, 11):  # resuming at step s: same batch, also from an in-memory array
    np.testing.assert_array_equal(lm_dataset.batch_at(src, s, 8, seed=1), run[s])
    np.testing.assert_array_equal(lm_dataset.batch_at(data, s, 8, seed=1), run[s])
  # One epoch = 5 steps visits every record once; the next epoch reshuffles.
  idx = [lm_dataset.batch_indices(40, s, 8, seed=1) for s in range(10)]
  assert sorted(np.concatenate(idx[:5])) == list(range(40))
  assert not np.array_equal(np.concatenate(idx[:5]), np.concatenate(idx[5:]))
  assert not np.array_equal(lm_dataset.batch_at(src, 0, 8, seed=2), run[0])


def test_dataset_bad_inputs(tok, tmp_path):
  tok.save(tmp_path / "tok.json")
  build = lambda files, T=16, **kw: lm_dataset.build_text_dataset(
    "bad", files, tmp_path / "tok.json", tmp_path / "d", context_length=T, **kw
  )
  with pytest.raises(FileNotFoundError):
    build([str(tmp_path / "missing.txt")])
  with pytest.raises(FileNotFoundError, match="no files match"):
    build([str(tmp_path / "nothing*.jsonl")])
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unknown format"):
    build([str(tmp_path / "x.csv")])
  (tmp_path / "x.txt").write_text("some text")
  with pytest.raises(ValueError, match="context_length"):
    build([str(tmp_path / "x.txt")], T=1)
  with pytest.raises(ValueError, match="fraction"):
    build([str(tmp_path / "x.txt")], sgld_fraction=0.6, validation_fraction=0.5)
  (tmp_path / "y.jsonl").write_text(json.dumps({"body": "hi"}))
  with pytest.raises(ValueError, match="no text field 'text'"):
    list(documents.read_documents(tmp_path / "y.jsonl"))
  with pytest.raises(ValueError, match="split must be"):
    lm_dataset.load_split(tmp_path, "none", "test")
  with pytest.raises(FileNotFoundError, match="no dataset"):
    lm_dataset.load_split(tmp_path, "none", "train")
  with pytest.raises(ValueError, match="batch_size"):
    lm_dataset.batch_at(np.zeros((4, 8), np.int32), 0, 5)


def test_a_tokenizers_own_bos_is_recorded_and_read_back(tok, tmp_path):
  """A dataset built with a tokenizer whose BOS is not 0 stores that id, and an LM run
  reading it (`run_bos_id`, what the report passes to the LM metrics) gets it back."""
  import ml_collections

  files = _write_shards(tmp_path)
  tok.save(tmp_path / "tok.json")
  bos_token = tok.tokenizer.id_to_token(7)
  lm_dataset.build_text_dataset(
    "tiny", files, tmp_path / "tok.json", tmp_path / "d", context_length=16, bos_token=bos_token
  )
  contexts = lm_dataset.load_array(lm_dataset.load_split(tmp_path / "d", "tiny", "train"))
  assert (contexts[:, 0] == 7).all()
  config = ml_collections.ConfigDict(
    dict(data=dict(source="tfds", data_dir=str(tmp_path / "d"), name="tiny"))
  )
  assert lm_dataset.run_bos_id(config, str(tmp_path)) == 7
