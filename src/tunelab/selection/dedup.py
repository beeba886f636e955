"""Deduplication of the pool before scoring: exact, and near-duplicate by MinHash LSH.

Exact: the record's text (every message, or the plain text), lower-cased with whitespace collapsed, hashed.
Near: Broder's MinHash (https://doi.org/10.1109/SEQUEN.1997.666900) estimates the Jaccard similarity of two
records' sets of word n-gram shingles; LSH banding (datasketch's `MinHashLSH`) finds candidate pairs without
comparing all of them, and a candidate counts as a duplicate when its MinHash estimate is >= threshold
(as in the near-dedup of Lee et al. 2022, https://arxiv.org/abs/2107.06499). The first occurrence is kept.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from tunelab.data.formats import ChatExample, PreferenceExample, TextExample
from tunelab.recipe.select import DedupConfig


@dataclass
class DedupResult:
    keep: list[int]  # indices kept, in order
    exact: int = 0  # dropped as exact duplicates
    near: int = 0  # dropped as near-duplicates
    duplicate_of: dict[int, int] = field(default_factory=dict)  # dropped index -> the kept index it duplicates


def example_text(ex) -> str:
    if isinstance(ex, TextExample):
        return ex.text
    if isinstance(ex, PreferenceExample):
        msgs = ex.prompt + ex.chosen + ex.rejected
    elif isinstance(ex, ChatExample):
        msgs = ex.messages
    else:
        raise TypeError(f"cannot deduplicate a {type(ex).__name__}")
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def shingles(text: str, n: int) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i: i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def deduplicate(examples: list, cfg: DedupConfig) -> DedupResult:
    res = DedupResult(keep=[])
    texts = [example_text(ex) for ex in examples]
    candidates = list(range(len(examples)))
    if cfg.exact:
        first: dict[str, int] = {}
        kept = []
        for i in candidates:
            h = hashlib.sha1(normalise(texts[i]).encode()).hexdigest()
            if h in first:
                res.exact += 1
                res.duplicate_of[i] = first[h]
            else:
                first[h] = i
                kept.append(i)
        candidates = kept
    if cfg.near and candidates:
        from datasketch import MinHash, MinHashLSH

        sets = [[s.encode() for s in shingles(texts[i], cfg.ngram)] for i in candidates]
        hashes = MinHash.bulk(sets, num_perm=cfg.num_perm, seed=1)  # one permutation table for all
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        kept_hashes: dict[int, MinHash] = {}
        for i, mh in zip(candidates, hashes):
            # LSH gives candidates; the MinHash estimate decides (banding alone has false positives)
            dup = next((j for j in lsh.query(mh) if kept_hashes[j].jaccard(mh) >= cfg.threshold), None)
            if dup is not None:
                res.near += 1
                res.duplicate_of[i] = dup
                continue
            lsh.insert(i, mh)
            kept_hashes[i] = mh
        candidates = list(kept_hashes)
    res.keep = candidates
    return res
