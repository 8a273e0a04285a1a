"""Flower's SecAgg+ run in process on the same sum as ``bench/secure_aggregation.py``.

Flower (``flwr``; not a project dependency, installed apart as docs/benchmarks.md
says) ships SecAgg+ as a client mod
(``flwr.client.mod.secure_aggregation.secaggplus_mod``: the four stages a client runs)
and a server workflow (``flwr.server.workflow.secure_aggregation.secaggplus_workflow``)
that drives them through its message grid. :func:`flower_protocol_cost` calls the mod's
stage functions for every client and does the workflow's server-side work with Flower's
own functions (the neighbour ring, forwarding the encrypted shares, the sum of the
masked vectors, share recombination and mask removal), as the workflow does between
its messages; only the messaging is left out, as it is on our side
(:func:`cardiofed.secure.simulate.run_protocol`). Same sites, the same fifth dropping
after sharing keys, the same vector, the workflow's default quantisation.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np


def flower_protocol_cost(n: int, length: int, neighbours: int, threshold: int
                         ) -> dict[str, Any] | None:
    """Seconds for one SecAgg+ sum of `n` clients' vectors of `length` (each client
    masking with `neighbours` others, `threshold` shares recovering a secret), a fifth
    dropping after sharing keys, or None when Flower is not installed."""
    try:
        import importlib

        from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
            generate_shared_key,
        )
        from flwr.common.secure_aggregation.ndarrays_arithmetic import (
            factor_extract,
            get_parameters_shape,
            parameters_addition,
            parameters_mod,
            parameters_subtraction,
        )
        from flwr.common.secure_aggregation.quantization import dequantize
        from flwr.common.secure_aggregation.secaggplus_constants import Key
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
        from flwr.supercore.primitives.asymmetric import (
            bytes_to_private_key,
            bytes_to_public_key,
        )
        # the module, not the function of the same name its package exports
        mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    except ImportError:
        return None
    clipping, quantisation, modulus, max_weight = 8.0, 4194304, 4294967296, 1000.0
    ids = list(range(1, n + 1))
    rng = np.random.default_rng(0)
    vectors = {i: rng.normal(0, 1, length) for i in ids}
    dropped = set(ids[: n // 5])
    share_num = neighbours + 1  # the client and its neighbours, as our plan counts them
    config = {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: share_num, Key.THRESHOLD: threshold,
              Key.CLIPPING_RANGE: clipping, Key.TARGET_RANGE: quantisation,
              Key.MOD_RANGE: modulus, Key.MAX_WEIGHT: max_weight}
    started = time.perf_counter()
    states = {i: mod.SecAggPlusState(nid=i) for i in ids}
    keys = {i: mod._setup(states[i], config) for i in ids}
    ring = ids[:]
    random.Random(0).shuffle(ring)
    half = share_num >> 1
    graph = {nid: {ring[(k + off) % n] for off in range(-half, half + 1)}
             for k, nid in enumerate(ring)}
    forwarded: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in ids}
    for i in ids:
        shares = mod._share_keys(states[i], {
            str(j): (keys[j][Key.PUBLIC_KEY_1], keys[j][Key.PUBLIC_KEY_2]) for j in graph[i]})
        for dst, box in zip(shares[Key.DESTINATION_LIST], shares[Key.CIPHERTEXT_LIST],
                            strict=True):
            forwarded[dst][0].append(i)
            forwarded[dst][1].append(box)
    alive = [i for i in ids if i not in dropped]
    masked = None
    for i in alive:  # the dropped clients shared their keys, then sent no vector
        srcs, boxes = forwarded[i]
        out = mod._collect_masked_vectors(
            states[i], {Key.CIPHERTEXT_LIST: boxes, Key.SOURCE_LIST: srcs},
            1, ndarrays_to_parameters([vectors[i]]))
        vec = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
        masked = vec if masked is None else parameters_addition(masked, vec)
    assert masked is not None
    masked = parameters_mod(masked, modulus)
    collected: dict[int, list[bytes]] = {i: [] for i in ids}
    for i in alive:
        answer = mod._unmask(states[i], {
            Key.ACTIVE_NODE_ID_LIST: [j for j in graph[i] if j not in dropped],
            Key.DEAD_NODE_ID_LIST: [j for j in graph[i] if j in dropped]})
        for owner, share in zip(answer[Key.NODE_ID_LIST], answer[Key.SHARE_LIST],
                                strict=True):
            collected[owner].append(share)
    unmask_started = time.perf_counter()
    shape = get_parameters_shape(masked)
    for nid, share_list in collected.items():
        secret = combine_shares(share_list)
        if nid not in dropped:
            masked = parameters_subtraction(masked, pseudo_rand_gen(secret, modulus, shape))
            continue
        for peer in graph[nid] - {nid}:
            pair = pseudo_rand_gen(generate_shared_key(
                bytes_to_private_key(secret),
                bytes_to_public_key(keys[peer][Key.PUBLIC_KEY_1])), modulus, shape)
            masked = (parameters_addition(masked, pair) if nid > peer
                      else parameters_subtraction(masked, pair))
    total_ratio, recon = factor_extract(parameters_mod(masked, modulus))
    mean = dequantize(recon, clipping, quantisation)[0]
    mean = (mean - (len(alive) - 1) * clipping) * (quantisation / total_ratio)
    finished = time.perf_counter()
    expected = np.mean(np.clip([vectors[i] for i in alive], -clipping, clipping), axis=0)
    return {"sites": n, "length": length, "share_num": share_num, "threshold": threshold,
            "dropped": len(dropped), "seconds": finished - started,
            "seconds_per_site": (finished - started) / n,
            "unmask_s": finished - unmask_started,
            "max_abs_error": float(np.max(np.abs(mean - expected)))}
