"""Batches (batching.py): the (2B, T) layout of a pair batch, and the data order's resume and sharding."""

import pytest

from batching import collate, PairBatchSampler
from data import DataError


def test_collate_layout():
    exs = [dict(prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4, 5, 6]),
           dict(prompt_ids=[7], chosen_ids=[8, 9], rejected_ids=[10])]
    b = collate(exs, pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0], [1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert b["loss_mask"].tolist()[2] == [0, 0, 1, 1, 1]
    assert b["prompt_mask"].tolist()[3] == [1, 0, 0, 0, 0]
    left = collate(exs, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist()[0] == [0, 0, 1, 2, 3]
    assert (left["attention_mask"].sum(-1) == b["attention_mask"].sum(-1)).all()


def test_sampler_resumes_and_shards():
    full = iter(PairBatchSampler(10, 2, seed=3))
    first = [next(full) for _ in range(12)]  # crosses two epoch boundaries (5 batches per epoch)
    resumed = iter(PairBatchSampler(10, 2, seed=3, start_batch=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    assert sorted(sum(first[:5], [])) == list(range(10))  # an epoch sees every pair once
    r0, r1 = iter(PairBatchSampler(10, 2, 3, num_processes=2, rank=0)), iter(PairBatchSampler(10, 2, 3, 2, 1))
    g0, g1 = next(r0), next(r1)
    assert not set(g0) & set(g1) and len(g0) == len(g1) == 2
    with pytest.raises(DataError, match="global batch"):
        PairBatchSampler(3, 2, 0, num_processes=2)
