"""Train/test/ood split bookkeeping shared by the planning tasks.

train and test are kept disjoint by construction, not by seeds: every puzzle has a canonical key (e.g. its sorted
numbers and target, or its solution grid) and a stable hash of that key decides which of the two splits it belongs
to. Generators draw puzzles and reject those whose key belongs to the other split, so no seed scheme, dataset size or
small puzzle space (4×4 Sudoku has only 288 solution grids) can make a test puzzle appear in training data.
"""

from __future__ import annotations

import hashlib

from dreamlm.errors import DreamError

SPLITS = ("train", "test", "ood")
# One puzzle key in TEST_MODULUS goes to test (10 %), the rest to train.
TEST_MODULUS = 10


def check_split(split: str, *, has_ood: bool, task: str) -> str:
    """Return `split` if it is a known split the task supports, else raise DreamError."""
    if split not in SPLITS:
        raise DreamError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split == "ood" and not has_ood:
        raise DreamError(f"task {task} has no ood split")
    return split


def key_split(key: str) -> str:
    """The split ("train" or "test") a canonical puzzle key belongs to; stable across runs and platforms."""
    # sha256 rather than hash(): Python's str hash is salted per process.
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_MODULUS == 0 else "train"


def key_in_split(key: str, split: str) -> bool:
    """True if a puzzle with this key may appear in `split`; ood membership is the task's own rule, not the hash."""
    if split == "ood":
        return True
    return key_split(key) == split
