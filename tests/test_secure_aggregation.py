"""Secure aggregation: the ring codec, Shamir sharing, the neighbour graph, and whole
secure sums with sites dropping out at each step; what the coordinator sees."""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Collection

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiofed.exceptions import ConfigurationError, InvalidUpdate
from cardiofed.secure import shamir
from cardiofed.secure.noise import (
    MIN_SITE_SIGMA,
    DistributedNoise,
    discrete_gaussian,
    integer_sensitivity,
    tau,
)
from cardiofed.secure.protocol import (
    Advertisement,
    SecureSite,
    SecureSum,
    SumPlan,
    default_neighbours,
    neighbour_graph,
)
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum, run_protocol

# ---------------------------------------------------------------- the ring


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), bound=st.floats(1e-3, 1e3), scale=st.floats(1.0, 1e6),
       noise=st.floats(0, 1e6), data=st.data())
def test_no_sum_wraps_in_the_ring_for_sum_picks(n: int, bound: float, scale: float,
                                                noise: float, data: st.DataObject) -> None:
    """Sums of n extreme encodings plus the stated noise decode to themselves."""
    codec = RingCodec.for_sum(n, bound=bound, scale=scale, noise_bound=noise)
    sign = data.draw(st.sampled_from([-1.0, 1.0]))
    x = np.full(3, sign * bound)
    rng = np.random.default_rng(0)
    total = np.zeros(3, np.uint64)
    for _ in range(n):
        total = codec.add(total, codec.encode(x, rng))
    total = codec.add(total, codec.wrap(np.full(3, int(sign * math.floor(noise)))))
    expected = sign * (n * bound * scale + math.floor(noise))
    got = codec.signed(total)
    assert np.all(np.abs(got - expected) <= n)  # each encoding within one unit: no wrap


def test_the_ring_is_no_wider_than_it_needs_to_be() -> None:
    codec = RingCodec.for_sum(100, bound=1.0, scale=2**16)
    assert codec.bits == (2 * 100 * (2**16 + 1) + 1).bit_length() == 24  # +-8.4M holds 6.6M
    with pytest.raises(ConfigurationError, match="needs 8. bits, more than 64"):
        RingCodec.for_sum(10**6, bound=1e6, scale=1e12)
    with pytest.raises(ConfigurationError, match="'bits' parameter must be in"):
        RingCodec(bits=65, scale=1.0, bound=1.0)
    with pytest.raises(ConfigurationError, match="'scale' parameter must be a finite"):
        RingCodec(bits=32, scale=math.nan, bound=1.0)


def test_stochastic_rounding_is_unbiased() -> None:
    codec = RingCodec(bits=32, scale=1.0, bound=10.0)
    x = np.full(20_000, 0.3)
    ints = codec.signed(codec.encode(x, np.random.default_rng(1)))
    assert set(np.unique(ints)) == {0, 1}
    # mean 0.3, SE sqrt(0.21 / 20000) = 0.0032: a 4-SE band
    assert abs(ints.mean() - 0.3) < 4 * math.sqrt(0.21 / x.size)


def test_values_outside_the_bound_are_clipped_and_non_finite_refused() -> None:
    codec = RingCodec(bits=32, scale=10.0, bound=1.0)
    got = codec.decode(codec.encode(np.array([5.0, -5.0, 0.5]), np.random.default_rng(0)))
    np.testing.assert_array_equal(got, [1.0, -1.0, 0.5])
    with pytest.raises(ValueError, match="must be finite"):
        codec.encode(np.array([np.nan]), np.random.default_rng(0))


# ---------------------------------------------------------------- Shamir


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_threshold_shares_recover_the_secret_and_fewer_do_not(n: int,
                                                                 data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secret = secrets.token_bytes(32)
    ids = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, ids)
    chosen = data.draw(st.lists(st.sampled_from(ids), min_size=t, max_size=n, unique=True))
    assert shamir.combine({i: shares[i] for i in chosen}, t) == secret
    if t > 1:
        fewer = {i: shares[i] for i in chosen[:t - 1]}
        with pytest.raises(ValueError, match="cannot recover"):
            shamir.combine(fewer, t)
        # Interpolating t - 1 shares as if the threshold were t - 1 gives another value.
        with contextlib.suppress(ValueError):  # or no 32-byte value at all
            assert shamir.combine(fewer, t - 1) != secret


def test_t_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    """With threshold 2 a single share is a uniform field element: its top bytes do not
    depend on the secret (a chi-square test on its top byte over 2,000 splits)."""
    counts = np.zeros((2, 16))
    for row, secret in enumerate([bytes(32), b"\xff" * 32]):
        for _ in range(2_000):
            share = shamir.split(secret, 2, [1, 2])[1]
            counts[row, share[1] >> 4] += 1  # byte 0 holds the field's top bit only
    expected = counts.sum() / counts.size
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 70  # 31 degrees of freedom: p ~ 1e-4


# ---------------------------------------------------------------- the graph


def _ads(names: list[str]) -> dict[str, Advertisement]:
    return {n: Advertisement(n, secrets.token_bytes(32), secrets.token_bytes(32))
            for n in names}


@pytest.mark.parametrize("n", [3, 17, 18, 50, 201])
def test_the_neighbour_graph_is_symmetric_with_the_planned_degree(n: int) -> None:
    names = [f"site_{i:03d}" for i in range(n)]
    plan = SumPlan(context=b"s/1", codec=RingCodec(bits=32, scale=1, bound=1),
                   sites=tuple(names), length=1)
    graph = neighbour_graph(plan, _ads(names))
    k = default_neighbours(n)
    assert all(name not in peers for name, peers in graph.items())
    assert all(name in graph[p] for name, peers in graph.items() for p in peers)
    assert {len(peers) for peers in graph.values()} <= {k, k + 1}
    assert k == n - 1 if n <= 17 else k < n - 1


def test_the_graph_follows_the_keys_not_the_coordinator() -> None:
    names = [f"s{i:02d}" for i in range(40)]
    plan = SumPlan(context=b"s/1", codec=RingCodec(bits=32, scale=1, bound=1),
                   sites=tuple(names), length=1)
    ads = _ads(names)
    assert neighbour_graph(plan, ads) == neighbour_graph(plan, dict(reversed(ads.items())))
    assert neighbour_graph(plan, ads) != neighbour_graph(plan, _ads(names))


# ---------------------------------------------------------------- whole sums


class Run:
    """One secure sum driven in process (:func:`run_protocol`)."""

    def __init__(self, n: int, length: int = 5, **plan: int) -> None:
        names = [f"site_{i:02d}" for i in range(n)]
        self.plan = SumPlan(context=b"study/round 3/update",
                            codec=RingCodec.for_sum(n, bound=100.0, scale=2**10),
                            sites=tuple(names), length=length, **plan)
        self.rng = np.random.default_rng(7)
        self.x = {name: np.round(self.rng.normal(0, 10, length) * 2**10) / 2**10
                  for name in names}  # on the ring's grid: encoded exactly
        self.seen: list[object] = []  # everything the coordinator receives
        self.sites = {name: SecureSite(name, self.plan) for name in names}

    def run(self, **drops: Collection[str]) -> SecureSum:
        result, self.seen = run_protocol(self.sites, self.x,
                                         dict.fromkeys(self.x, self.rng), **drops)
        return result

    def expected(self, survivors: Collection[str]) -> np.ndarray:
        return np.sum([self.x[n] for n in survivors], axis=0)


def test_the_sum_is_exact_and_no_input_is_seen_in_the_clear() -> None:
    run = Run(6)
    result = run.run()
    np.testing.assert_allclose(result.total, run.expected(run.sites), atol=1e-9)
    assert result.dropped == ()
    codec = run.plan.codec
    inputs = run.seen[2]
    assert isinstance(inputs, dict)
    for name, masked in inputs.items():
        plain = codec.wrap(np.round(run.x[name] * codec.scale).astype(np.int64))
        assert not np.any(masked == plain)  # masked: no coordinate equals the encoding
    partial = codec.decode(codec.add(inputs["site_00"], inputs["site_01"]))
    assert np.all(np.abs(partial - run.expected(["site_00", "site_01"])) > 1.0)


def test_a_fifth_of_the_sites_dropping_after_sharing_leaves_the_survivors_exact_sum(
        ) -> None:
    run = Run(30)
    dropped = [f"site_{i:02d}" for i in (1, 4, 9, 13, 22, 27)]  # 20%
    result = run.run(drop_before_input=dropped)
    survivors = [n for n in run.sites if n not in dropped]
    assert result.dropped == tuple(dropped)
    np.testing.assert_allclose(result.total, run.expected(survivors), atol=1e-9)


def test_dropouts_at_every_step_together() -> None:
    run = Run(40)
    before_sharing, before_input = ["site_03", "site_30"], ["site_07", "site_21", "site_33"]
    before_unmask = ["site_11", "site_25"]  # sent inputs, then went quiet: still counted
    result = run.run(drop_before_sharing=before_sharing, drop_before_input=before_input,
                     drop_before_unmask=before_unmask)
    survivors = [n for n in run.sites if n not in before_sharing + before_input]
    assert result.survivors == tuple(survivors)
    np.testing.assert_allclose(result.total, run.expected(survivors), atol=1e-9)


def test_too_few_shares_stop_the_sum_instead_of_guessing() -> None:
    run = Run(5, neighbours=4, threshold=5)
    with pytest.raises(InvalidUpdate,
                       match="shares of the self-mask of site 'site_0.' were revealed; 5"):
        run.run(drop_before_unmask=["site_02"])


def test_a_coordinator_with_threshold_minus_one_sites_cannot_recover_a_self_mask() -> None:
    run = Run(9, neighbours=8, threshold=5)
    run.run()
    revealed = run.seen[3]
    assert isinstance(revealed, dict)
    colluders = list(revealed)[:run.plan.threshold - 1]
    target = next(n for n in run.sites if n not in colluders)
    shares = {run.plan.holder_id(c): revealed[c][target][1] for c in colluders}
    with pytest.raises(ValueError, match="cannot recover"):
        shamir.combine(shares, run.plan.threshold)
    own = run.sites[target]._b_seed
    with contextlib.suppress(ValueError):
        assert shamir.combine(shares, len(shares)) != own


def test_each_site_reveals_one_share_per_neighbour_once() -> None:
    run = Run(4)
    run.run()
    site = run.sites["site_00"]
    with pytest.raises(InvalidUpdate, match="reveals shares once"):
        site.unmask(["site_00", "site_01"])
    fresh = Run(4)
    ads = {n: s.advertise() for n, s in fresh.sites.items()}
    with pytest.raises(InvalidUpdate, match="own keys as it sent them"):
        fresh.sites["site_00"].share_keys({**ads, "site_00": ads["site_01"]})
    with pytest.raises(InvalidUpdate, match="a masked input comes once, after"):
        fresh.sites["site_01"].masked_input(np.zeros(5), {}, fresh.rng)


def test_a_site_listed_as_dropped_by_the_coordinator_refuses_to_reveal() -> None:
    run = Run(4)
    ads = {n: s.advertise() for n, s in run.sites.items()}
    outbox = {n: s.share_keys(ads) for n, s in run.sites.items()}
    site = run.sites["site_00"]
    site.masked_input(run.x["site_00"], {s: outbox[s]["site_00"] for s in outbox
                                         if s != "site_00"}, run.rng)
    with pytest.raises(InvalidUpdate, match="not listed as a survivor"):
        site.unmask(["site_01", "site_02"])
    with pytest.raises(InvalidUpdate, match="A sum of 1 input is below the plan's 2"):
        site.unmask(["site_00"])


def test_a_tampered_share_is_refused() -> None:
    run = Run(3)
    ads = {n: s.advertise() for n, s in run.sites.items()}
    outbox = {n: s.share_keys(ads) for n, s in run.sites.items()}
    box = bytearray(outbox["site_01"]["site_00"])
    box[-1] ^= 1
    with pytest.raises(InvalidUpdate, match="The share pair from 'site_01' does not open: "
                                            "it was not sealed for 'site_00' in this sum"):
        run.sites["site_00"].masked_input(run.x["site_00"], {
            "site_01": bytes(box), "site_02": outbox["site_02"]["site_00"]}, run.rng)


# ---------------------------------------------------------------- distributed DP


def test_the_discrete_gaussian_has_its_variance_and_its_mass_function() -> None:
    rng = np.random.default_rng(3)
    draws = discrete_gaussian(5.0, 60_000, rng)
    assert draws.dtype == np.int64 and abs(draws.mean()) < 4 * 5 / math.sqrt(60_000)
    # var of N_Z(0, 25) is 25 to 1e-30; the sample variance's SE is 25 * sqrt(2 / n)
    assert abs(draws.var() - 25.0) < 4 * 25 * math.sqrt(2 / 60_000)
    small = discrete_gaussian(1.5, 40_000, rng)
    support = np.arange(-6, 7)
    pmf = np.exp(-support**2 / (2 * 1.5**2))
    pmf /= np.exp(-np.arange(-60, 61) ** 2 / (2 * 1.5**2)).sum()
    observed = np.array([(small == k).sum() for k in support])
    expected = pmf * small.size
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 12 degrees of freedom: p ~ 1e-5


def test_the_tau_term_is_negligible_at_the_smallest_site_noise() -> None:
    assert tau(MIN_SITE_SIGMA, 10**9) * 10**9 < 1e-28
    assert tau(1.0, 2) * 10 > 1e-8  # why the floor: at sigma 1 it is not negligible


def test_distributed_noise_accounts_the_sum_and_refuses_too_little_per_site() -> None:
    delta = integer_sensitivity(clip=1.0, scale=2**12, dim=16)
    noise = DistributedNoise(noise_multiplier=1.1, sensitivity=delta, min_sites=8)
    assert noise.site_sigma == pytest.approx(1.1 * delta / math.sqrt(8))
    assert noise.event().noise_multiplier == 1.1 and noise.event().sample_rate == 1.0
    with pytest.raises(ConfigurationError, match="below 3, where the sum .* raise the codec"):
        DistributedNoise(noise_multiplier=1.0, sensitivity=5.0, min_sites=100)


def _noisy_plan(n: int, length: int, scale: float) -> tuple[SumPlan, DistributedNoise]:
    delta = integer_sensitivity(clip=1.0, scale=scale, dim=length)
    noise = DistributedNoise(noise_multiplier=0.5, sensitivity=delta, min_sites=n - 2)
    codec = RingCodec.for_sum(n, bound=1.0, scale=scale, noise_bound=noise.noise_bound(n))
    return SumPlan(context=b"dp", codec=codec, sites=tuple(f"site_{i}" for i in range(n)),
                   length=length, min_inputs=n - 2), noise


def test_a_noisy_secure_sum_carries_every_sites_share_of_the_noise() -> None:
    n, length, scale = 8, 4_000, 2.0**8
    plan, noise = _noisy_plan(n, length, scale)
    sites = {name: SecureSite(name, plan) for name in plan.sites}
    rng = np.random.default_rng(11)
    result, _ = run_protocol(sites, {name: np.zeros(length) for name in sites},
                             dict.fromkeys(sites, rng), noise=noise)
    total = result.total * scale  # ring units
    expected_sd = math.sqrt(n) * noise.site_sigma
    assert abs(total.std() / expected_sd - 1) < 4 / math.sqrt(2 * length)
    assert abs(total.mean()) < 4 * expected_sd / math.sqrt(length)


def test_the_ring_sum_is_what_the_protocol_unmasks() -> None:
    """The simulator's arithmetic (no keys) gives the protocol's sum bit for bit, for
    the same sites' generators: the masks cancel exactly."""
    n, length = 6, 50
    plan, noise = _noisy_plan(n, length, 2.0**12)
    x = {name: np.random.default_rng(k).normal(0, 0.3, length)
         for k, name in enumerate(plan.sites)}
    sites = {name: SecureSite(name, plan) for name in plan.sites}
    by_protocol, _ = run_protocol(sites, x, {name: np.random.default_rng(100 + k)
                                             for k, name in enumerate(plan.sites)},
                                  noise=noise)
    by_arithmetic = ring_sum(plan.codec, x, {name: np.random.default_rng(100 + k)
                                             for k, name in enumerate(plan.sites)}, noise)
    np.testing.assert_array_equal(by_protocol.total, by_arithmetic)


def test_sites_refuse_to_unmask_fewer_inputs_than_the_noise_was_split_over() -> None:
    run = Run(8, min_inputs=6)
    with pytest.raises(InvalidUpdate, match="A sum of 5 inputs is below the plan's 6"):
        run.run(drop_before_input=["site_00", "site_01", "site_02"])
