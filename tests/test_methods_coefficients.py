"""Per-expert coefficients: every registered method takes them; all ones is the paper; more weight pulls the merge
toward that expert; hand-computed meanings per method (docs/methods.md has the table)."""

from __future__ import annotations

import pytest
import torch
from methods_support import cosine, run

from mergelab.methods import METHODS, MergeContext
from mergelab.methods.iso import IsoCConfig, IsoCtsConfig, iso_c, iso_cts
from mergelab.methods.optmerge import OptMergeConfig, optmerge
from mergelab.methods.ties import TiesConfig, ties
from mergelab.methods.tsv import TsvConfig, tsv
from mergelab.methods.weight_average import WeightAverageConfig, weight_average
from mergelab.methods.wudi import WudiConfig, wudi

NAMES = sorted(METHODS)
CTX = MergeContext(name="w")


def two_experts() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return 0.05 * torch.randn(2, 24, 16, generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_takes_coefficients(name: str) -> None:
    cfg = METHODS[name].make_config({"coefficients": [0.5, 2.0]})
    assert cfg.coefficients == (0.5, 2.0)


@pytest.mark.parametrize("name", NAMES)
def test_all_ones_is_the_paper_bit_for_bit(name: str) -> None:
    deltas = two_experts()
    paper = run(name, torch.zeros(24, 16), deltas, seed=3)
    torch.testing.assert_close(
        run(name, torch.zeros(24, 16), deltas, {"coefficients": (1.0, 1.0)}, seed=3), paper, rtol=0, atol=0
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("favoured", [0, 1])
def test_more_weight_moves_the_merge_toward_that_expert(name: str, favoured: int) -> None:
    """Two independent dense experts: weighting one 4x must raise the merge's cosine with it (and lower the
    other's), for sums, weighted means, loss weights and scaled spectra alike. TIES moves least (about 0.015 here):
    its weights act only where the trimmed experts overlap."""
    deltas = two_experts()
    coefs = [1.0, 1.0]
    coefs[favoured] = 4.0
    plain = run(name, torch.zeros(24, 16), deltas, seed=3)
    weighted = run(name, torch.zeros(24, 16), deltas, {"coefficients": coefs}, seed=3)
    other = 1 - favoured
    assert cosine(weighted, deltas[favoured]) > cosine(plain, deltas[favoured]) + 0.01
    assert cosine(weighted, deltas[other]) < cosine(plain, deltas[other]) - 0.01


@pytest.mark.parametrize("name", NAMES)
def test_wrong_number_of_coefficients_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="coefficients has 3 entries but tensor w has 2 experts"):
        run(name, torch.zeros(24, 16), two_experts(), {"coefficients": (1.0, 1.0, 2.0)})


def test_weights_must_be_non_negative_where_they_weigh_a_mean_or_a_loss() -> None:
    for name in ("weight_average", "ties", "dare_ties", "wudi", "optmerge"):
        with pytest.raises(ValueError, match="coefficients are weights"):
            METHODS[name].make_config({"coefficients": (1.0, -1.0)})
    for name in ("task_arithmetic", "tsv", "iso_c", "iso_cts"):  # scales of task vectors: negation allowed
        assert METHODS[name].make_config({"coefficients": (1.0, -1.0)}).coefficients == (1.0, -1.0)


def test_weight_average_is_the_weighted_mean() -> None:
    d = torch.tensor([[1.0, -2.0], [3.0, 5.0]])
    out = weight_average(None, d, WeightAverageConfig(coefficients=(3.0, 1.0)), CTX)
    torch.testing.assert_close(out, torch.tensor([1.5, -0.25]))  # (3 * d0 + d1) / 4


def test_ties_weighs_the_election_and_the_disjoint_mean() -> None:
    """density 1 (no trimming): entry 0 agrees (+4, +2): weighted mean (3*4 + 1*2) / 4 = 3.5; entry 1 disagrees
    (+1, -2): the weighted sum 3 - 2 > 0 elects +, so only expert 0 counts: 1 (plain TIES elects - and gives -2)."""
    d = torch.tensor([[4.0, 1.0], [2.0, -2.0]])
    out = ties(None, d, TiesConfig(density=1.0, coefficients=(3.0, 1.0)), CTX)
    torch.testing.assert_close(out, torch.tensor([3.5, 1.0]))
    torch.testing.assert_close(ties(None, d, TiesConfig(density=1.0), CTX), torch.tensor([3.0, -2.0]))


def test_spectral_methods_scale_the_task_vectors() -> None:
    d = two_experts()
    c = (0.5, 2.0)
    scaled = d * torch.tensor(c).reshape(2, 1, 1)
    torch.testing.assert_close(
        tsv(None, d, TsvConfig(coefficients=c), CTX), tsv(None, scaled, TsvConfig(), CTX)
    )
    torch.testing.assert_close(
        iso_c(None, d, IsoCConfig(coefficients=c), CTX), iso_c(None, scaled, IsoCConfig(), CTX)
    )
    torch.testing.assert_close(
        iso_cts(None, d, IsoCtsConfig(coefficients=c), CTX), iso_cts(None, scaled, IsoCtsConfig(), CTX)
    )


@pytest.mark.parametrize("init", ["sum", "mean"])
def test_loss_methods_zero_weight_leaves_an_expert_out(init: str) -> None:
    """c = (1, 0, 1): the middle expert leaves the loss (w_i = 0) and the initialisation (weighted sum / mean), so
    the merge equals the one of the other two experts (uncentred target, fixed rank ratio)."""
    g = torch.Generator().manual_seed(12)
    d = 0.05 * torch.randn(3, 9, 7, generator=g)
    kw = {"variant": "lora", "rank_ratio": 0.5, "init": init, "steps": 20, "lr": 1e-2}
    got = optmerge(None, d, OptMergeConfig(coefficients=(1.0, 0.0, 1.0), **kw), CTX)
    torch.testing.assert_close(
        got, optmerge(None, d[[0, 2]], OptMergeConfig(**kw), CTX), rtol=1e-5, atol=1e-7
    )
    wkw = {"init": init, "optimizer": "sgd", "lr": 1e-2, "steps": 20}
    got = wudi(None, d, WudiConfig(coefficients=(1.0, 0.0, 1.0), **wkw), CTX)
    torch.testing.assert_close(got, wudi(None, d[[0, 2]], WudiConfig(**wkw), CTX), rtol=1e-5, atol=1e-7)


def test_optmerge_loss_weight_is_c_over_norm_squared() -> None:
    """w_i = c_i / ||tau_i||^2: c = (2, 2) doubles the gradient, so SGD at lr equals c = 1 at 2 lr (the mean init
    is the same for uniform weights)."""
    g = torch.Generator().manual_seed(13)
    d = 0.05 * torch.randn(2, 8, 6, generator=g)
    kw = {"variant": "lora", "init": "mean", "steps": 30, "optimizer": "sgd"}
    doubled = optmerge(
        None, d, OptMergeConfig(coefficients=(2.0, 2.0), lr=1e-2, **kw), CTX
    )  # mean init unchanged
    torch.testing.assert_close(
        doubled, optmerge(None, d, OptMergeConfig(lr=2e-2, **kw), CTX), rtol=1e-5, atol=1e-7
    )
