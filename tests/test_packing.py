"""Packing: best-fit decreasing, per-epoch plans, and the packed row's tensors."""
import random

from hypothesis import given, settings, strategies as st

from fastmath.packing import (IGNORE_INDEX, best_fit_decreasing, collate_packed, count_loss_tokens, plan_epoch,
                              shifted_targets)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=0, max_size=200), st.integers(100, 300))
def test_bfd_places_every_item_once_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # No two bins could be merged: BFD opens a bin only when nothing fits.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    if len(loads) >= 2:
        assert loads[0] + loads[1] > capacity


def test_bfd_is_close_to_the_lower_bound():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 2048)
    lower_bound = -(-sum(lengths) // 2048)
    assert len(bins) <= lower_bound + 1
    assert sum(lengths) / (len(bins) * 2048) > 0.97


def test_bfd_rejects_an_item_larger_than_a_bin():
    try:
        best_fit_decreasing([5, 300], 100)
    except ValueError as err:
        assert "document 1 has 300 tokens" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_epoch_plan_is_deterministic_and_changes_per_epoch():
    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(300)]
    a0, a0_again, a1 = plan_epoch(lengths, 256, 7, 0), plan_epoch(lengths, 256, 7, 0), plan_epoch(lengths, 256, 7, 1)
    assert a0 == a0_again
    assert a0 != a1
    assert sorted(i for b in a1 for i in b) == list(range(300))


def test_collate_restarts_positions_and_shifts_inside_documents():
    doc_a = ([10, 11, 12, 13], [False, False, True, True])
    doc_b = ([20, 21, 22], [False, True, True])
    batch = collate_packed([doc_a, doc_b])
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7]
    assert str(batch.cu_seqlens.dtype) == "torch.int32"
    assert batch.max_seqlen == 4
    # Token 11 predicts 12, 12 predicts 13; 13 (end of doc a) must NOT predict 20.
    x = IGNORE_INDEX
    assert batch.targets.tolist() == [[x, 12, 13, x, 21, 22, x]]
    assert batch.num_loss_tokens == count_loss_tokens(doc_a[1]) + count_loss_tokens(doc_b[1]) == 4


def test_shifted_targets_all_masked():
    assert shifted_targets([1, 2, 3], [False, False, False]) == [IGNORE_INDEX] * 3
