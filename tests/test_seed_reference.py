"""Self-checks of tests/seed_reference.py, the oracle other tests compare against, on a toy vocabulary."""

import random

import pytest

from seed_reference import (DocumentDatabase, create_masked_lm_predictions, generate_epoch,
                            read_documents)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_corpus(rng, num_docs=12):
    """Documents of 1 to 9 sentences; doc k's words are "dk_*" pieces (some "##" ones) so B's source shows."""
    docs = []
    for k in range(num_docs):
        words = [f"d{k}_{w}" for w in range(6)] + [f"##d{k}_{w}" for w in range(3)]
        doc = [[rng.choice(words) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 9))]
        docs.append(doc)
    docs[0] = docs[0][:1]  # single-sentence documents always get a random next sentence
    vocab = SPECIAL + sorted({t for doc in docs for s in doc for t in s})
    return docs, vocab


def unmasked(record):
    tokens = list(record["tokens"])
    for pos, label in zip(record["masked_lm_positions"], record["masked_lm_labels"]):
        tokens[pos] = label
    return tokens


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_seq_len,wwm", [(16, False), (32, True), (128, False)])
def test_epoch_invariants(seed, max_seq_len, wwm):
    rng = random.Random(seed)
    docs, vocab = toy_corpus(rng)
    masked_lm_prob, max_pred = 0.15, 5
    records = generate_epoch(docs, vocab, rng, max_seq_len=max_seq_len, masked_lm_prob=masked_lm_prob,
                             max_predictions_per_seq=max_pred, whole_word_mask=wwm)
    assert records
    for r in records:
        tokens = unmasked(r)  # random replacements may draw [CLS]/[SEP]: check structure on the original
        n = len(tokens)
        assert n <= max_seq_len and len(r["segment_ids"]) == n
        first_sep = tokens.index("[SEP]")
        assert tokens[0] == "[CLS]" and tokens.count("[CLS]") == 1
        assert tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]" and 1 < first_sep < n - 1
        assert r["segment_ids"] == [0] * (first_sep + 1) + [1] * (n - first_sep - 1)

        positions = r["masked_lm_positions"]
        assert positions == sorted(set(positions))
        assert all(tokens[p] not in ("[CLS]", "[SEP]") for p in positions)
        assert all(r["tokens"][p] == "[MASK]" or r["tokens"][p] in vocab for p in positions)
        num_to_mask = min(max_pred, max(1, int(round(n * masked_lm_prob))))
        if wwm:
            assert 1 <= len(positions) <= num_to_mask
        else:
            assert len(positions) == min(num_to_mask, n - 3)

        # B comes from another document exactly when is_random_next.
        doc_of = {t.lstrip("#").split("_")[0] for t in tokens[first_sep + 1:-1]}
        doc_a = {t.lstrip("#").split("_")[0] for t in tokens[1:first_sep]}
        assert len(doc_a) == 1
        assert (doc_of != doc_a) == r["is_random_next"]
        if doc_a == {"d0"}:
            assert r["is_random_next"]


def test_whole_word_masking_keeps_words_and_does_not_join_across_sep():
    tokens = ["[CLS]", "a", "##b", "[SEP]", "##c", "d", "[SEP]"]
    seen = set()
    for seed in range(200):
        # 7 tokens * 0.3 rounds to a budget of 2 predictions.
        _, positions, labels = create_masked_lm_predictions(
            list(tokens), 0.3, 20, True, ["a", "##b", "##c", "d"], random.Random(seed))
        assert (1 in positions) == (2 in positions)
        assert labels == [tokens[p] for p in positions]
        seen.add(tuple(positions))
    # The seed joined "##c" to "a ##b" (a 3-piece word over budget, never masked); here it is a word alone.
    assert (4,) in seen or (4, 5) in seen


def test_sample_doc_is_sentence_weighted_and_never_current():
    db = DocumentDatabase([[["x"]], [["y"]], [["z"]] * 8])
    rng = random.Random(0)
    picks = [db.sample_doc(0, rng) for _ in range(3000)]
    assert all(p is not db[0] for p in picks)
    share_long = sum(p is db[2] for p in picks) / len(picks)
    assert abs(share_long - 8 / 9) < 0.03


def test_read_documents_seed_format():
    lines = ["one two\n", "three\n", "\n", "   \n", "four\n", "\n", "five six\n"]
    assert read_documents(lines, str.split) == [[["one", "two"], ["three"]], [["four"]], [["five", "six"]]]


def test_single_document_refused():
    with pytest.raises(ValueError, match="document breaks"):
        generate_epoch([[["a", "b"], ["c"]]], ["a", "b", "c"], random.Random(0))
