"""ZeRO communication per GPU per optimizer step, and how long it takes.

Volumes are those of ring collectives (each GPU sends and receives (n−1)/n of the gathered
or reduced buffer; Patarasuk & Yuan 2009, NCCL's ring algorithm). With P the bytes of the
bf16 parameters (2Ψ):

* ZeRO-3, every micro-batch: all-gather of the weights in forward (P), again in backward
  (P), reduce-scatter of the gradients (P): 3P, as in the ZeRO paper (Rajbhandari et al.
  2020, §7.2.2) and the ZeRO++ paper (Wang et al. 2023, §3).
* ZeRO-2: a reduce-scatter of the gradients every micro-batch, one all-gather of the updated
  weights per step. ZeRO-1: gradients accumulate locally, so one reduce-scatter and one
  all-gather per step. ZeRO-0 (DDP): one all-reduce (2P) per step.
* ZeRO++ (Wang et al. 2023): qwZ all-gathers int8 weights (block-quantised, P/2); hpZ keeps
  a secondary weight shard inside each node, so the backward all-gather stays on NVLink;
  qgZ reduces int4 gradients hierarchically (intra-node all-to-all, then across nodes),
  cutting the cross-node gradient volume to P/4. Together: 3P → 0.75P across nodes, the
  paper's headline figure.

A collective over GPUs on several nodes is limited by the NICs (one per GPU on DGX/HGX
nodes), one inside a node by NVLink.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommVolume:
    """Bytes one GPU sends per optimizer step, by the link they cross."""

    inter_node_bytes: float
    intra_node_bytes: float

    def seconds(self, nic_bytes_per_s: float, nvlink_bytes_per_s: float) -> float:
        """Transfer time at the given achieved bandwidths (one direction, per GPU).

        Args:
            nic_bytes_per_s: achieved inter-node bandwidth per GPU.
            nvlink_bytes_per_s: achieved intra-node bandwidth per GPU.
        """
        t = 0.0
        if self.inter_node_bytes:
            t += self.inter_node_bytes / nic_bytes_per_s
        if self.intra_node_bytes:
            t += self.intra_node_bytes / nvlink_bytes_per_s
        return t


def ring(n: int) -> float:
    """Fraction of a buffer each rank moves in a ring all-gather or reduce-scatter."""
    return (n - 1) / n if n > 1 else 0.0


def zero_comm_volume(
    params: int,
    stage: int,
    gpus_per_node: int,
    nodes: int,
    grad_accum_steps: int,
    hpz_partition_size: int = 1,
    quantized_weights: bool = False,
    quantized_gradients: bool = False,
) -> CommVolume:
    """Bytes per GPU per optimizer step for ZeRO ``stage`` on ``nodes × gpus_per_node`` GPUs.

    Args:
        params: parameters of the model (Ψ); bf16 weights and gradients (2 bytes each).
        stage: ZeRO stage 0–3.
        gpus_per_node: GPUs per node.
        nodes: nodes; every GPU is a data-parallel rank.
        grad_accum_steps: micro-batches per step (ZeRO-3 gathers every micro-batch).
        hpz_partition_size: ZeRO++ hpZ secondary shard group (1: off).
        quantized_weights: ZeRO++ qwZ, int8 weight all-gather.
        quantized_gradients: ZeRO++ qgZ, int4 gradient reduction.
    """
    p = 2.0 * params
    n = gpus_per_node * nodes
    inter: float = 0.0
    intra: float = 0.0

    def add(nbytes: float, group: int, crosses_nodes: bool) -> None:
        nonlocal inter, intra
        if crosses_nodes:
            inter += nbytes * ring(group)
        else:
            intra += nbytes * ring(group)

    multi = nodes > 1
    if stage == 3:
        weights = p / 2 if quantized_weights else p
        for _ in range(grad_accum_steps):
            add(weights, n, multi)  # forward all-gather
            if hpz_partition_size > 1:
                add(p, min(hpz_partition_size, n), multi and hpz_partition_size > gpus_per_node)
            else:
                add(weights, n, multi)  # backward all-gather
            if quantized_gradients:
                add(p / 4, gpus_per_node, False)  # intra-node int4 all-to-all
                add(p / 4, nodes, multi)  # cross-node int4 all-to-all
            else:
                add(p, n, multi)  # reduce-scatter
    elif stage == 2:
        for _ in range(grad_accum_steps):
            add(p, n, multi)
        add(p, n, multi)
    elif stage == 1:
        add(p, n, multi)
        add(p, n, multi)
    else:
        add(2 * p, n, multi)
    return CommVolume(inter, intra)
