"""Device placement, checked without a GPU.

A tensor made without a device lands on the CPU; on a GPU run it then meets CUDA tensors and the step
dies (or, worse, silently computes on the CPU). No CPU test can see that by running the code, so these
read it: every tensor factory in the modules a worker or a scorer runs names its device (or derives it
with `*_like`), every `torch.from_numpy` is moved on at once, every generator names its device, and every
`torch.load` says where its tensors go. A deliberate CPU tensor says `device="cpu"`.
"""
import ast
from pathlib import Path

import pytest
import torch

from alterrec_dist.common.device import CPU_TILE_ROWS, configure_kernels, tile_rows, trained_autocast, worker_device

PACKAGE = Path(__file__).resolve().parents[2] / "alterrec_dist"
# what runs inside a training worker, or scores a saved model
ENGINE_FOLDERS = ("parallel", "model", "eval", "training", "serve")  # every module in them
ENGINE_MODULES = ("common/device", "export", "batch_score", "recommend")
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "randint", "randn", "rand", "randperm",
             "linspace", "eye", "Generator"}


def torch_calls(tree: ast.AST):
    """(call, name) for every `torch.NAME(...)` call, with each node's parent set."""
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            yield node, node.func.attr


def placement_problems(source: str, where: str) -> list[str]:
    problems = []
    for call, name in torch_calls(ast.parse(source)):
        keywords = {k.arg for k in call.keywords}
        line = f"{where}:{call.lineno}: torch.{name}"
        if name in FACTORIES and "device" not in keywords:
            problems.append(f"{line} without device=")
        if name == "from_numpy":
            parent = getattr(call, "parent", None)
            if not (isinstance(parent, ast.Attribute) and parent.attr == "to"):
                problems.append(f"{line} not followed by .to(device)")
        if name == "load" and "map_location" not in keywords:
            problems.append(f"{line} without map_location=")
    return problems


def test_every_tensor_of_the_engine_names_its_device():
    files = [PACKAGE / f"{m}.py" for m in ENGINE_MODULES]
    files += [f for folder in ENGINE_FOLDERS for f in sorted((PACKAGE / folder).rglob("*.py"))]
    problems = [p for f in files for p in placement_problems(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not problems, "tensors that would stay on the CPU in a GPU run:\n" + "\n".join(problems)


def test_the_check_finds_what_it_is_for():
    """The checker itself: each kind of misplacement is reported, and the placed forms pass."""
    bad = ("torch.zeros(3)\ntorch.arange(n, dtype=torch.long)\ntorch.Generator().manual_seed(1)\n"
           "torch.from_numpy(a)\ntorch.load(path, weights_only=True)\n")
    good = ("torch.zeros(3, device=d)\ntorch.zeros_like(x)\ntorch.Generator(device=d)\n"
            "torch.from_numpy(a).to(d)\ntorch.load(p, map_location='cpu')\n")
    assert len(placement_problems(bad, "bad")) == 5
    assert placement_problems(good, "good") == []


def test_cpu_workers_and_their_defaults():
    cpu = worker_device(False)
    assert cpu == torch.device("cpu")
    assert tile_rows(0, cpu, 1024) == CPU_TILE_ROWS and tile_rows(7, cpu, 1024) == 7
    # a GPU gets one wide tile: a 1M-row shard at G = 1024 in one fp32 (G, tile) score tile of 4 GiB
    assert tile_rows(0, torch.device("cuda", 0), 1024) == 1 << 20
    assert tile_rows(0, torch.device("cuda", 0), 1 << 20) == CPU_TILE_ROWS  # never narrower than the CPU's


@pytest.mark.parametrize("engine, precision, autocast", [("ddp", "bf16", True), ("ddp", "fp32", False),
                                                         ("deepspeed", "bf16", False)])
def test_only_the_ddp_engine_autocasts_and_only_in_bf16(engine, precision, autocast):
    layer = torch.nn.Linear(4, 4)
    with trained_autocast(torch.device("cpu"), engine, precision):
        out = layer(torch.randn(2, 4))
    assert (out.dtype == torch.bfloat16) == autocast


@pytest.fixture
def kernel_settings():
    """configure_kernels sets process-wide flags: each test that calls it leaves the process as it found it."""
    threads = torch.get_num_threads()
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_a_cpu_worker_sums_an_index_backward_in_one_order(kernel_settings):
    """With two threads or more, two identical torchrun runs differed in their losses' last bits (and test metrics
    in the fourth decimal after 5 epochs): the backward of `rows[index]` (repeated indices) accumulated in thread
    order. A CPU worker now uses torch's deterministic kernels."""
    def index_backward() -> torch.Tensor:
        torch.manual_seed(0)
        x = torch.randn(20_000, 64, requires_grad=True)
        index, grad = torch.randint(0, 2_000, (300_000,)), torch.randn(300_000, 64)
        x[index].backward(grad)
        return x.grad

    configure_kernels(torch.device("cpu"), tf32=False, cpu_threads=2)
    assert torch.get_num_threads() == 2
    first = index_backward()
    assert all(torch.equal(first, index_backward()) for _ in range(4))


def test_a_cpu_worker_runs_the_configs_thread_count_not_the_launchers(kernel_settings):
    """LayerNorm's backward sums per thread: a Ray worker (1 thread) and a process started by hand (every core)
    trained the same config to other losses (reviewer finding). The config's count is set."""
    torch.set_num_threads(2)
    configure_kernels(torch.device("cpu"), tf32=False, cpu_threads=1)
    assert torch.get_num_threads() == 1


def test_a_gpu_configured_after_the_cpu_runs_without_deterministic_kernels(kernel_settings):
    """bench.gpu runs a CPU leg first in its process: its deterministic mode stayed on for every GPU measurement
    after it (production GPU workers never ran with it, and it NaN-fills every torch.empty). Configuring a GPU
    sets flags only, so a machine without one checks it."""
    configure_kernels(torch.device("cpu"), tf32=False, cpu_threads=1)
    assert torch.are_deterministic_algorithms_enabled()
    configure_kernels(torch.device("cuda", 0), tf32=True, cpu_threads=1)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
