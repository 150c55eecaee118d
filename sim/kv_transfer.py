"""What moving a prompt's KV cache from a prefill replica to a decode replica costs.

Each GPU of the prefill replica holds the KV of its own KV heads (and its pipeline stage's
layers); the decode replica's GPUs pull theirs in parallel, one link per GPU (NIXL/UCX in
vLLM's NixlConnector, Mooncake's transfer engine, NVIDIA Dynamo). The slowest side bounds the
transfer: the largest per-GPU share at either end over one GPU's link, plus a fixed start-up
latency per transfer. So Llama-3-70B (bf16, 327,680 B per token) with a 4,096-token prompt
moves 1,342,177,280 B: 26.84 ms + latency over one 400 Gb/s (50 GB/s) link at tp1 -> tp1,
an eighth of that at tp8 -> tp8.

Which link (``deployment.kv_transfer.link``): ``nvlink`` (the hw cards' link_bw_gbps, one
direction), ``network`` (network_bw_gbps: the card's NIC bandwidth per GPU), or ``auto``:
NVLink when both pools are the same NVSwitch GPU and the whole deployment fits one
node, else the network. ``bw_gbps`` / ``latency_us`` override the cards' numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from conf import ConfigError, shapes

LINKS = ("auto", "nvlink", "network")
NVLINK_INTERCONNECTS = ("nvswitch",)   # nvlink_pairs joins only two GPUs


@dataclass(frozen=True)
class Link:
    kind: str                 # nvlink | network
    bw_gbps: float            # GB/s per GPU, one direction
    latency_us: float         # fixed cost per transfer (connection set-up, descriptors, first byte)

    def why(self) -> str:
        return f"{self.kind} {self.bw_gbps:g} GB/s per GPU, {self.latency_us:g} us per transfer"


def choose_link(conf, hw_p, hw_d, total_gpus: int) -> Link:
    """The link KV travels over (see the module docstring); conf is deployment.kv_transfer."""
    kind = str(conf.link)
    if kind not in LINKS:
        raise ConfigError(f"deployment.kv_transfer.link={kind!r}; choose one of {list(LINKS)}")
    if kind == "auto":
        same_node = (hw_p.name == hw_d.name and hw_p.interconnect in NVLINK_INTERCONNECTS
                     and total_gpus <= hw_p.devices_per_node)
        kind = "nvlink" if same_node else "network"
    if kind == "nvlink":
        bw = min(hw_p.link_bw_gbps, hw_d.link_bw_gbps)
    else:
        bw = min(hw_p.network_bw_gbps, hw_d.network_bw_gbps)
    latency = max(hw_p.network_latency_us, hw_d.network_latency_us)
    if conf.bw_gbps > 0:
        bw = float(conf.bw_gbps)
    if conf.latency_us >= 0:
        latency = float(conf.latency_us)
    if bw <= 0:
        raise ConfigError(f"no {kind} bandwidth for the KV transfer between {hw_p.name} and {hw_d.name}: "
                          f"set it in their hw cards or deployment.kv_transfer.bw_gbps")
    return Link(kind, float(bw), float(latency))


def bytes_per_token_per_gpu(model, tp: int, pp: int) -> int:
    """KV bytes of one token on the busiest GPU of a (tp, pp) replica."""
    return shapes.kv_bytes_per_token(model, tp, pp)


@dataclass(frozen=True)
class Transfer:
    """Time to move n tokens' KV between a (tp_p, pp_p) and a (tp_d, pp_d) replica."""
    link: Link
    src_bytes_per_token: int      # busiest prefill GPU
    dst_bytes_per_token: int      # busiest decode GPU
    total_bytes_per_token: int    # the whole replica (what crosses the links in all)

    def seconds(self, num_tokens: int) -> float:
        per_gpu = max(self.src_bytes_per_token, self.dst_bytes_per_token) * num_tokens
        return self.link.latency_us * 1e-6 + per_gpu / (self.link.bw_gbps * 1e9)


def transfer_model(model_p, lay_p, model_d, lay_d, link: Link) -> Transfer:
    """Transfer pricing for a prefill layout lay_p and a decode layout lay_d (conf.shapes.Layout)."""
    if shapes.kv_dtype(model_p) != shapes.kv_dtype(model_d):
        raise ConfigError(f"the prefill pool stores KV as {shapes.kv_dtype(model_p)} and the decode pool as "
                          f"{shapes.kv_dtype(model_d)}; a KV hand-off needs one KV dtype (model.kv_dtype)")
    return Transfer(link, bytes_per_token_per_gpu(model_p, lay_p.tp, lay_p.pp),
                    bytes_per_token_per_gpu(model_d, lay_d.tp, lay_d.pp), shapes.kv_bytes_per_token(model_p, 1))
