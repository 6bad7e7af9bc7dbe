"""Under DDP the recipe stays the plan's: the global batch is split across processes (foreground share
included) and every process runs every iteration; validation patches and cases are split without repeats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from medseg.loading.datamodule import PatchBatches, ValidationPatches, Volumes, batch_share
from medseg.errors import ConfigError


class _Cache:
    """Preprocessed cases as PreprocessedCache returns them: each case's image is filled with its number, so a
    patch tells which case it came from."""

    def __init__(self, cases: int):
        self.cases = cases

    def load_arrays(self, case_id, mmap=True):
        data = np.full((1, 14, 18, 16), float(case_id), dtype=np.float32)
        label = np.zeros((14, 18, 16), dtype=np.uint8)
        label[5:9, 6:12, 5:10] = 1
        return data, label, {1: np.argwhere(label == 1)}

    def load_volume(self, case_id, mmap=True):
        data, label, _ = self.load_arrays(case_id)
        return data, label


def test_the_batch_is_split_like_nnunet():
    # 8 samples, the last round(8 * 0.33) = 3 forced to foreground, over 3 GPUs: 3 + 3 + 2
    assert [batch_share(8, 3, r, 3) for r in range(3)] == [(3, 0), (3, 1), (2, 2)]
    assert [batch_share(4, 1, r, 2) for r in range(2)] == [(2, 0), (2, 1)]
    assert batch_share(2, 1, 0, 1) == (2, 1)
    with pytest.raises(ConfigError, match="batch size 2 is smaller than the 4 processes"):
        batch_share(2, 1, 0, 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(1, 8), st.floats(0, 1))
def test_the_shares_add_up_to_the_plans_batch_and_its_foreground_share(batch, world, oversample):
    if batch < world:
        return
    forced = int(round(batch * oversample))
    shares = [batch_share(batch, forced, r, world) for r in range(world)]
    assert sum(s for s, _ in shares) == batch and sum(f for _, f in shares) == forced
    assert all(0 <= f <= s for s, f in shares) and max(s for s, _ in shares) - min(s for s, _ in shares) <= 1


def test_every_rank_runs_every_iteration_with_its_share_of_the_batch():
    ranks = []
    for rank in range(2):
        batches = PatchBatches(_Cache(3), ["0", "1", "2"], [8, 8, 8], 4, 5, 0.33, None)
        batches.set_rank(rank, 2)
        ranks.append(batches)
        assert len(batches) == 5  # iterations are not split between the ranks
        image, label = batches[0]
        assert image.shape == (2, 1, 8, 8, 8)
    # the one forced sample of the global batch (round(4 * 0.33) = 1) is the second rank's last
    assert (ranks[0].num_foreground, ranks[1].num_foreground) == (0, 1)
    assert all(ranks[1][i][1][1].any() for i in range(5))


def test_validation_patches_are_fixed_per_epoch_and_different_on_each_rank():
    one = ValidationPatches(_Cache(4), ["0", "1", "2", "3"], [8, 8, 8], 4, 6, 0.5, seed=3)
    assert len(one) == 6
    first = one[2]
    again = one[2]
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], again[:2])) and first[2] == again[2]
    image, label, ids = first
    assert image.shape == (4, 1, 8, 8, 8) and label.shape == (4, 1, 8, 8, 8) and len(ids) == 4
    assert label[2:].flatten(1).any(1).all()  # the foreground half
    shares = []
    for rank in range(2):
        patches = ValidationPatches(_Cache(4), ["0", "1", "2", "3"], [8, 8, 8], 4, 6, 0.5, seed=3)
        patches.set_rank(rank, 2)
        shares.append([patches[i] for i in range(len(patches))])
    assert [len(s) for s in shares] == [6, 6] and all(b[0].shape[0] == 2 for s in shares for b in s)
    # 2 x 2 samples per iteration: the global batch of patches, drawn independently on each rank
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(*shares))
    assert ValidationPatches(_Cache(1), [], [8, 8, 8], 4, 6, 0.5).iterations == 0  # fold=all: nothing held out


def test_validation_volumes_are_split_between_ranks_without_repeats():
    cases = [str(i) for i in range(5)]
    shares = []
    for rank in range(2):
        volumes = Volumes(_Cache(5), cases)
        volumes.set_rank(rank, 2)
        shares.append([volumes[i][2] for i in range(len(volumes))])
    assert sorted(itertools.chain(*shares)) == cases  # each case once: no padding to equal shares
    assert [len(s) for s in shares] == [3, 2]
