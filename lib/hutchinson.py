"""Hutchinson probes: random v with E[v v^T] = I, so E[v^T J v] = tr(J)."""
import torch

VTYPES = ("rademacher", "gaussian")


def check_vtype(vtype):
    """Return vtype if it names a probe distribution, else raise ValueError listing the allowed ones."""
    if vtype not in VTYPES:
        raise ValueError(f"unknown vtype {vtype!r}; allowed: {', '.join(VTYPES)}")
    return vtype


def sample_probe(like, vtype="rademacher", generator=None):
    """A probe shaped, typed and placed like the tensor ``like``.

    Rademacher probes (+-1) give the lower-variance estimator for a fixed Jacobian
    (their squares are exactly 1); Gaussian probes are the classic choice.
    """
    check_vtype(vtype)
    if vtype == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def divergence_estimate(out, inp, probe, create_graph=False):
    """v^T (d out / d inp) v per example.

    out, inp, probe: (B, ...) with ``out`` a differentiable function of ``inp``.
    Returns (B,). One vector-Jacobian product: grad(out . v) = J^T v, and
    v^T J^T v = v^T J v.
    """
    (jtv,) = torch.autograd.grad(out, inp, probe, create_graph=create_graph)
    return (jtv * probe).flatten(1).sum(1)
