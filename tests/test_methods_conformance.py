"""Conformance suite over every registered merging method (STYLE.md 11): a new registry line is tested at once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from methods_support import run

from mergelab.methods import METHODS, scale_of

NAMES = sorted(METHODS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_zero_deltas_return_base(name: str, base_dtype: torch.dtype, device: torch.device) -> None:
    base = torch.randn(12, 8, device=device).to(base_dtype)
    tau = run(name, base, torch.zeros(3, 12, 8, device=device))
    assert tau.shape == base.shape and tau.dtype == torch.float32 and tau.device == base.device
    assert torch.isfinite(tau).all() and not tau.any()
    merged = (base.float() + scale_of(METHODS[name].make_config({})) * tau).to(base_dtype)
    assert torch.equal(merged, base)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_and_determinism(
    name: str, compute_dtype: torch.dtype, device: torch.device
) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, 7, generator=g).to(device=device, dtype=torch.bfloat16)
    deltas = (0.01 * torch.randn(3, 10, 7, generator=g)).to(device=device, dtype=compute_dtype)
    a, b = run(name, base, deltas, seed=5), run(name, base, deltas, seed=5)
    assert a.shape == base.shape and a.dtype == compute_dtype and a.device == base.device
    assert torch.isfinite(a).all() and a.any()
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_single_expert_gives_that_expert(name: str) -> None:
    """Merging one expert under the row's ``single_expert`` parameters returns it. The task vector is isotropic
    (0.3 x orthonormal columns), so spectrum-flattening methods (Iso-C, Iso-CTS) must return it too."""
    params = METHODS[name].single_expert
    if params is None:
        pytest.skip(f"{name} declares no setting that returns a single expert")
    tau = 0.3 * torch.linalg.qr(torch.randn(9, 6, generator=torch.Generator().manual_seed(2))).Q
    out = run(name, torch.zeros(9, 6), tau.unsqueeze(0), dict(params))
    torch.testing.assert_close(out, tau, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_one_zero_expert_among_others(name: str) -> None:
    """A frozen part (one all-zero expert) must not produce NaN/Inf (0/0 in norm-weighted losses) or wipe the merge."""
    g = torch.Generator().manual_seed(3)
    deltas = 0.02 * torch.randn(3, 8, 6, generator=g)
    deltas[1] = 0.0
    out = run(name, torch.zeros(8, 6), deltas)
    assert torch.isfinite(out).all() and out.any()


@pytest.mark.parametrize("name", NAMES)
def test_bad_coefficients_are_named(name: str) -> None:
    """Every method validates its config: a non-numeric coefficient is a one-line error naming the field."""
    with pytest.raises(ValueError, match="coefficients") as info:
        METHODS[name].make_config({"coefficients": (1.0, "x")})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS[n].matrix_only])
def test_matrix_only_methods_reject_vectors(name: str) -> None:
    with pytest.raises(ValueError, match="2-D"):
        run(name, torch.zeros(5), torch.randn(2, 5))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="bogus"):
        METHODS[name].make_config({"bogus": 1})


#: Settings each method is checked under where its config has the fields (named by field, never by method).
VARIANTS: list[dict[str, Any]] = [
    {},
    {"coefficients": (0.5, 1.0, 2.0)},
    {"scope": "global"},
    {"variant": "lora"},
    {"span_only": True},
]
CASES = [
    pytest.param(name, v, id=f"{name}-{'-'.join(v) or 'defaults'}")
    for name in NAMES
    for v in VARIANTS
    if set(v) <= set(getattr(METHODS[name].config_cls, "__dataclass_fields__", {}))
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_inputs_untouched_and_inplace_gives_the_same_merge(name: str, params: dict[str, Any]) -> None:
    """A library call (``ctx.inplace=False``) leaves ``base`` and ``deltas`` as they were; the engine's call
    (``inplace=True``, the method may overwrite ``deltas``) gives the same merge bit for bit."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(10, 7, generator=g)
    deltas = 0.02 * torch.randn(3, 10, 7, generator=g)
    base0, deltas0 = base.clone(), deltas.clone()
    out = run(name, base, deltas, params, seed=2)
    assert torch.equal(base, base0) and torch.equal(deltas, deltas0)
    assert out.data_ptr() not in (base.data_ptr(), deltas.data_ptr())
    handed_over = deltas.clone()
    assert torch.equal(run(name, base, handed_over, params, seed=2, inplace=True), out)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_determinism_given_a_generator(name: str, params: dict[str, Any]) -> None:
    """Same generator seed, same merge (every pass of a global method included); results never depend on the
    global RNG."""
    g = torch.Generator().manual_seed(10)
    deltas = 0.02 * torch.randn(3, 10, 7, generator=g)
    a = run(name, torch.zeros(10, 7), deltas, params, seed=11)
    torch.manual_seed(123)  # the global RNG must not matter
    b = run(name, torch.zeros(10, 7), deltas, params, seed=11)
    assert torch.equal(a, b)
