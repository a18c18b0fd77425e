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


def _flat(steps):
    return [i for step in steps for row in step for i in row]


def test_epoch_plan_is_deterministic_and_changes_per_epoch():
    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(300)]
    a0, a0_again, a1 = plan_epoch(lengths, 256, 2, 7, 0), plan_epoch(lengths, 256, 2, 7, 0), plan_epoch(lengths, 256, 2, 7, 1)
    assert a0 == a0_again
    assert a0 != a1
    assert sorted(_flat(a1)) == list(range(300))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=150), st.integers(1, 4), st.integers(0, 3))
def test_epoch_plan_places_every_document_once(lengths, rows_per_step, seed):
    steps = plan_epoch(lengths, 300, rows_per_step, seed, 0)
    assert sorted(_flat(steps)) == list(range(len(lengths)))
    assert all(1 <= len(step) <= rows_per_step for step in steps)
    assert all(sum(lengths[i] for i in row) <= 300 for step in steps for row in step)


def test_steps_are_random_samples_and_rows_stay_full():
    """Two kinds of documents (short and long): every step mixes both, and rows are >95% full."""
    lengths = [30] * 1000 + [90] * 1000
    steps = plan_epoch(lengths, 2048, 2, 0, 0)
    for step in steps[:-1]:
        docs = [i for row in step for i in row]
        short = sum(lengths[i] == 30 for i in docs)
        assert 0.25 < short / len(docs) < 0.75
    full_rows = [row for step in steps[:-1] for row in step]
    assert sum(lengths[i] for row in full_rows for i in row) / (len(full_rows) * 2048) > 0.95


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
