"""What one inner step of the generator costs: FLOPs, gradient reduction, checkpoint bytes.

FLOPs are counted by ``torch.utils.flop_counter``; the rest is arithmetic over the model's size,
the DeepSpeed section and a ``Cluster`` of stated assumptions (``launch/plan.py`` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass

from lcm_dist.config import RunConfig


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@dataclass(frozen=True)
class Cluster:
    """The cluster a run is planned for; the defaults are stated in every plan's output."""

    nodes: int = 1
    gpus_per_node: int = 1
    accelerator_tflops: float = 400.0
    """Dense bf16 peak of one accelerator, TFLOP/s (a current datacenter GPU: ~400-1000)."""
    utilisation: float = 0.4
    """Fraction of that peak the generator's convolutions reach."""
    interconnect_gbps: float = 100.0
    """Bandwidth of each process's slowest link in the gradient ring, Gbit/s."""
    store_mbps: float = 1000.0
    """Bandwidth of the latent store shared by all processes, MB/s."""
    checkpoint_mbps: float = 1000.0
    """Write bandwidth of the run folder's filesystem shared by all processes, MB/s."""
    step_seconds: float | None = None
    """Seconds per batch (all inner steps); None = computed from the FLOPs and links above."""

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ModelCost:
    """What one image costs in one inner step (forward and backward), counted by
    ``torch.utils.flop_counter``, and the generator's size."""

    generator_parameters: int
    generator_buffers: int
    forward_flops: int
    """Latent net and generator forward, per image."""
    backward_flops: int
    """Their backward (gradients for phi, theta and every activation), per image."""


def model_cost(cfg: RunConfig) -> ModelCost:
    """Counts the FLOPs of one image's inner step: the generator on the meta device (nothing
    computed), the latent net on the CPU (tens of MFLOP)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lcm_dist.model.generator import Generator, count_parameters
    from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi

    m = cfg.model
    side = m.noise_size - 2 * len(m.latent_widths)
    net = BatchedLatentNet(m)
    phi = initial_phi(m)[None].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fwd_net:
        z = net(phi)
    with FlopCounterMode(display=False) as bwd_net:
        z.sum().backward()
    with torch.device("meta"):
        gen = Generator(m)
        # Two images: BatchNorm in training mode needs more than one value per channel.
        z = torch.zeros(2, m.latent_widths[-1], side, side, requires_grad=True)
    with FlopCounterMode(display=False) as fwd_gen:
        out = gen(z)
    with FlopCounterMode(display=False) as bwd_gen:
        out.sum().backward()
    return ModelCost(
        generator_parameters=count_parameters(gen),
        generator_buffers=sum(b.numel() for b in gen.buffers() if b.is_floating_point()),
        forward_flops=fwd_net.get_total_flops() + fwd_gen.get_total_flops() // 2,
        backward_flops=bwd_net.get_total_flops() + bwd_gen.get_total_flops() // 2,
    )


def gradient_itemsize(ds: dict) -> int:
    """Bytes per gradient element DeepSpeed reduces: ``communication_data_type`` if set, else
    the generator's dtype (bf16 with ``deepspeed.bf16``, else fp32)."""
    comm = ds.get("communication_data_type")
    if comm:
        return 4 if str(comm).lower() in ("fp32", "float32") else 2
    return 2 if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") else 4


def ring_traffic_bytes(payload: int, processes: int, zero_stage: int) -> float:
    """Bytes each process sends per inner step to reduce the gradients over ``processes``:
    a ring all-reduce (or ZeRO 1-2's reduce-scatter plus all-gather) moves 2 (P-1)/P of the
    payload; ZeRO-3 gathers the parameters once more for the backward pass: 3 (P-1)/P."""
    if processes <= 1:
        return 0.0
    return (3 if zero_stage == 3 else 2) * (processes - 1) / processes * payload


@dataclass(frozen=True)
class StepTime:
    """One inner step of one process: compute, gradient communication and what is exposed."""

    compute_seconds: float
    comm_seconds: float
    exposed_comm_seconds: float

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.exposed_comm_seconds

    @property
    def efficiency(self) -> float:
        """Scaling efficiency: the share of the step spent computing."""
        return self.compute_seconds / self.seconds


def inner_step_time(
    cost: ModelCost,
    batch_size: int,
    cluster: Cluster,
    grad_itemsize: int,
    zero_stage: int,
    overlap: bool,
) -> StepTime:
    """Compute at the cluster's sustained FLOP/s, plus the gradient reduction at its link
    bandwidth; with ``overlap`` the reduction runs during the backward pass and only what
    outlasts it is exposed."""
    flops = (cost.forward_flops + cost.backward_flops) * batch_size
    rate = cluster.accelerator_tflops * 1e12 * cluster.utilisation
    compute = flops / rate
    backward = cost.backward_flops * batch_size / rate
    payload = cost.generator_parameters * grad_itemsize
    traffic = ring_traffic_bytes(payload, cluster.processes, zero_stage)
    comm = traffic * 8 / (cluster.interconnect_gbps * 1e9)
    exposed = max(0.0, comm - backward) if overlap else comm
    return StepTime(compute, comm, exposed)


def checkpoint_bytes(cfg: RunConfig, cost: ModelCost, processes: int, chunks: int) -> dict:
    """Bytes of one checkpoint folder by file kind: the generator's fp32 weights
    (generator.safetensors), DeepSpeed's module weights in the generator's dtype, its optimizer
    state (an fp32 master copy under ZeRO >= 1 or bf16, plus SGD momentum or Adam's two
    moments), each process's RNG and BatchNorm statistics, and the slot table."""
    ds = cfg.deepspeed
    p, buffers = cost.generator_parameters, cost.generator_buffers
    bf16 = isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    opt = ds["optimizer"]
    kind, params = opt["type"].lower(), opt.get("params", {})
    per_param = 8 if "adam" in kind else 4 if params.get("momentum", 0) else 0
    master = 4 if (stage >= 1 or bf16) else 0
    return {
        "generator.safetensors": 4 * (p + buffers),
        "engine weights": (2 if bf16 else 4) * (p + buffers),
        "optimizer state": (master + per_param) * p,
        "RNG and BatchNorm statistics": processes * (4 * buffers + 6_000),
        "slot table": chunks,
    }


def measure_inner_step(cfg: RunConfig, repeats: int = 3) -> tuple[float, str]:
    """Seconds of one inner step (latent nets and generator forward and backward, SGD on both)
    at ``data.batch_size`` on this machine's first GPU or its CPU, the best of ``repeats``
    after one warm-up, and what it ran on; one process, no gradient reduction."""
    import time

    import torch

    from lcm_dist.model.generator import Generator
    from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi
    from lcm_dist.model.loss import lcm_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m, b = cfg.model, cfg.data.batch_size
    net, gen = BatchedLatentNet(m).to(device), Generator(m).to(device)
    phi = initial_phi(m).to(device).repeat(b, 1).requires_grad_(True)
    images = torch.rand(b, m.image_channels, m.image_size, m.image_size, device=device)
    optimizer = torch.optim.SGD(gen.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = lcm_loss(gen(net(phi)), images, cfg.train.lap_levels, cfg.train.mse_weight)
        loss["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            phi -= 1e-3 * phi.grad
            phi.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "this machine's CPU"
    return min(times[1:]), f"one inner step measured on {name}: {_ms(min(times[1:]))}"
