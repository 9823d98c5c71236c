"""Worker messages survive pickling (how they cross Ray) with every field, dtype and value."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from stage_workers.messages import ExtendBatch, ExtendResult, Segment, TrunkState


def trunk(dtype, backout: bool) -> TrunkState:
    x = torch.randn(5, 8).to(dtype)
    return TrunkState(x, torch.randn(5, 8).to(dtype), torch.randn(5, 8).to(dtype) if backout else None)


def assert_same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        u, v = getattr(a, name), getattr(b, name)
        if isinstance(u, torch.Tensor):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), name
        elif isinstance(u, TrunkState):
            assert_same(u, v)
        else:
            assert u == v, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_extend_batch_and_result_round_trip_through_pickle(dtype):
    batch = ExtendBatch([Segment(7, 3, 2, 1), Segment(9, 0, 3, 0)], torch.arange(5), None, trunk(dtype, True))
    result = ExtendResult(trunk(dtype, False), torch.randn(1, 11))
    for message in (batch, result, ExtendResult(None, None), ExtendBatch([Segment(1, 0, 5)], torch.arange(5),
                                                                         torch.tensor([-1]))):
        assert_same(pickle.loads(pickle.dumps(message, protocol=5)), message)


def test_tensors_travel_as_out_of_band_buffers_not_in_the_pickle_stream():
    """What makes a Ray hop cheap: protocol 5 hands the tensors' bytes over as buffers."""
    result = ExtendResult(trunk(torch.bfloat16, True), torch.randn(4, 1000))
    buffers = []
    stream = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 4 and len(stream) < 2000  # x, x0, x_backout, logits: ~28 KB of data
    back = pickle.loads(stream, buffers=buffers)
    assert_same(back, result)
    assert back.logits.data_ptr() == np.asarray(buffers[-1].raw()).__array_interface__["data"][0]  # no copy
