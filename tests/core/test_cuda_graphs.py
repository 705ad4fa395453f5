"""CaptureAudit: what a CUDA-graph capture would refuse or silently freeze is named before any capture starts."""

import pytest
import torch

from swiftstep.core.cuda_graphs import CaptureAudit, CaptureHazard

X = torch.randn(4, 3)
HAZARDS = {
    "item": (lambda: X.sum().item(), "_local_scalar_dense"),
    "bool": (lambda: bool((X > 0).any()), "_local_scalar_dense"),
    "nonzero": (lambda: X.nonzero(), "nonzero"),
    "bool mask": (lambda: X[X > 0], "index"),
    "masked_select": (lambda: X.masked_select(X > 0), "masked_select"),
    "randn": (lambda: torch.randn(3), "randn"),
    "randn_like": (lambda: torch.randn_like(X), "randn_like"),
    "normal_": (lambda: X.clone().normal_(), "normal_"),
    "bernoulli": (lambda: torch.bernoulli(X.sigmoid()), "bernoulli"),
    "host data": (lambda: X * torch.tensor([1.0, 2.0, 3.0]), "lift_fresh"),
    "device copy": (lambda: X.to("meta"), "_to_copy"),
}


@pytest.mark.parametrize("name", list(HAZARDS))
def test_each_hazard_is_named(name):
    fn, op = HAZARDS[name]
    with pytest.raises(CaptureHazard, match=rf"the region cannot be captured in a CUDA graph: aten\.({op})"):
        with CaptureAudit("the region"):
            fn()


def test_capturable_work_passes_and_is_counted():
    buf = torch.zeros(4, 3)
    with CaptureAudit() as audit:
        y = torch.where(X > 0, X, 0.0).to(torch.float16).float().exp()  # dtype casts on one device are fine
        buf.copy_(y * 0.5 + buf)
        idx = torch.zeros(1, dtype=torch.long)
        buf.index_select(0, idx).sub_(1)  # device-side indexing: no sync
    assert audit.ops >= 8
    torch.testing.assert_close(buf, torch.where(X > 0, X, 0.0).to(torch.float16).float().exp() * 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_to_device_copies_are_named_on_a_gpu():
    with pytest.raises(CaptureHazard, match=r"aten\._to_copy .*copies between \['cpu', 'cuda'\]"):
        with CaptureAudit("the region"):
            X.cuda()
    on_gpu = X.cuda()
    with CaptureAudit() as audit:
        (on_gpu * 2.0).half()  # on-device work passes
    assert audit.ops >= 2
