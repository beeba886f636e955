"""Exact and MinHash near-duplicate removal, checked against exact Jaccard similarity."""

import random

import numpy as np
import pytest

from tunelab.data.formats import ChatExample, TextExample
from tunelab.recipe.select import DedupConfig
from tunelab.selection.dedup import deduplicate, example_text, jaccard, shingles

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cyan magenta yellow black white").split()


def _doc(rng, n=60):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _mutate(rng, text, k):
    words = text.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def test_exact_duplicates_ignore_case_and_whitespace():
    a = ChatExample([{"role": "user", "content": "Hello  there"}, {"role": "assistant", "content": "Hi"}])
    b = ChatExample([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi "}])
    c = ChatExample([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "bye"}])
    res = deduplicate([a, b, c, a], DedupConfig(exact=True, near=False))
    assert res.keep == [0, 2] and res.exact == 2 and res.duplicate_of == {1: 0, 3: 0}


def test_minhash_near_duplicates_against_exact_jaccard():
    rng = random.Random(0)
    docs = []
    for _ in range(25):
        base = _doc(rng)
        docs.append(base)
        docs.append(_mutate(rng, base, rng.choice([1, 2, 20, 40])))  # near copy or a different text
    examples = [TextExample(d, f"f:{i + 1}") for i, d in enumerate(docs)]
    cfg = DedupConfig(exact=False, near=True, threshold=0.7, num_perm=256, ngram=3)
    res = deduplicate(examples, cfg)
    sets = [shingles(example_text(e), 3) for e in examples]
    for i, j in res.duplicate_of.items():
        assert j < i and j in res.keep
        assert jaccard(sets[i], sets[j]) > 0.5  # never far from the threshold
    kept = set(res.keep)
    for i in range(len(docs)):
        for j in range(i):
            jac = jaccard(sets[i], sets[j])
            if jac >= 0.85 and j in kept:  # clearly above the threshold: the later one is gone
                assert i not in kept, (i, j, jac)
            if jac <= 0.5 and i in res.duplicate_of:
                assert res.duplicate_of[i] != j
    assert res.near >= 10


def test_minhash_estimate_close_to_exact_jaccard():
    from datasketch import MinHash

    rng = random.Random(1)
    for _ in range(10):
        a = _doc(rng, 80)
        b = _mutate(rng, a, rng.randint(1, 40))
        sa, sb = shingles(a, 3), shingles(b, 3)
        ma, mb = MinHash.bulk([[s.encode() for s in sa], [s.encode() for s in sb]], num_perm=256, seed=1)
        assert ma.jaccard(mb) == pytest.approx(jaccard(sa, sb), abs=0.12)
    assert np.isclose(jaccard(set(), set()), 1.0)
