"""pytest-benchmark: every fused kernel, every backend this machine has, against plain-torch comparison rows.

    pytest bench/test_kernels.py --benchmark-only          2^24 float32 elements per buffer (MAMLEN_BENCH_N=...)
    pytest bench/test_kernels.py --benchmark-disable       once each at 4099 elements (what CI runs)

Rows per op (`benchmark.group` = op):
- `reference`: kernels/reference.py through the public function (plain torch ops, the unfused truth);
- `cpp`: the C++ library (skipped when it is not built, e.g. MAMLEN_NO_CPP=1);
- `triton`: the Triton kernels on CUDA tensors (skipped without a CUDA device: on CPU they only run under the
  interpreter, which measures nothing useful);
- `torch.compile(reference)`: the same reference function fused by inductor (its C++ backend on CPU; skipped
  with the compiler's message when it cannot compile here);
- `torch.optim.AdamW(fused=True)` for `adamw_step_`, and a tensor copy (`copy` group, 8 B/element), the
  bandwidth floor.
`extra_info` records bytes moved per element under the streaming model and the GB/s that implies.
Inputs are built once per module. The markdown report with p20/p80 and ratios interleaved round by round is
`python bench/bench_kernels.py` (bench/results/kernels.md).
"""
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from mamlen import kernels
from mamlen.kernels import reference

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parent / "bench_kernels.py")
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)  # Data (the buffers), BYTES (streaming model), HP

ADAMW = dict(bench_kernels.HP, step=3)
SGD = dict(lr=1e-3, weight_decay=0.01)
# op: (buffers of bench_kernels.Data passed positionally, buffers mutated in place, keyword hyper-parameters)
OPS = {
    "adamw_step_": (("p", "g", "m", "v"), ("p", "m", "v"), ADAMW),
    "inner_adamw_forward": (("p", "g", "m", "v"), (), ADAMW),
    "inner_adamw_adjoint": (("p_bar", "m_bar", "v_bar", "g", "m_new", "v_new"), (), ADAMW),
    "inner_sgd_forward": (("p", "g"), (), SGD),
    "inner_sgd_adjoint": (("p_bar",), (), SGD),
    "sgd_step_": (("p", "g", "m", "v"), ("p", "m", "v"), dict(SGD, beta1=0.9, beta2=0.999)),
    "fd_perturb": (("p", "m"), (), dict(r=1e-3)),
    "fd_combine_": (("p_bar", "g", "m"), ("p_bar",), dict(scale=0.5)),
}
VARIANTS = ("reference", "cpp", "triton", "torch.compile(reference)")
UNTIMED_COMPILE = ("adamw_step_", "inner_adamw_forward")  # keep CI short: one in-place and one out-of-place op


def _n(timed: bool) -> int:
    if "MAMLEN_BENCH_N" in os.environ:
        return int(os.environ["MAMLEN_BENCH_N"])
    return 1 << 24 if timed else 4099  # untimed: odd, not a multiple of any block size


@pytest.fixture(scope="module")
def cpu_data(timed):
    return bench_kernels.Data(_n(timed))


@pytest.fixture(scope="module")
def cuda_data(timed):
    if not torch.cuda.is_available():
        pytest.skip("triton: no CUDA device (on CPU the kernels only run under TRITON_INTERPRET=1)")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton: not installed (pip install -e '.[gpu]')")
    d = bench_kernels.Data(_n(timed))
    for name, t in vars(d).items():
        if isinstance(t, torch.Tensor):
            setattr(d, name, t.cuda())
    return d


@pytest.fixture(scope="module")
def inductor():
    """A skip reason when torch.compile cannot build CPU code here, else None (checked once per module)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "torch.compile: no C++ compiler for inductor's CPU backend (install g++)"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"; say which
        return f"torch.compile cannot compile on this machine: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # time the kernels, not their launch


def _record(benchmark, op: str, n: int, timed: bool):
    benchmark.extra_info.update({"elements": n, "bytes_per_element": bench_kernels.BYTES[op]})
    if timed:
        gbps = bench_kernels.BYTES[op] * n / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GB/s"] = round(gbps, 2)


def _run(benchmark, fn, device, timed: bool, slow: bool = False):
    def call():
        out = fn()
        _sync(device)
        return out

    # the unfused references take ~1 s per call at 2^24 on 2 cores: fewer rounds
    return benchmark.pedantic(call, rounds=(3 if slow else 10) if timed else 1, warmup_rounds=1 if timed else 0)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", list(OPS))
def test_kernel(benchmark, request, timed, op, variant):
    if variant == "cpp" and not kernels.CPP_AVAILABLE:
        pytest.skip("cpp: the C++ kernels are not built (MAMLEN_NO_CPP=1, or the build failed)")
    if variant.startswith("torch.compile"):
        if not timed and op not in UNTIMED_COMPILE:
            pytest.skip(f"untimed run: torch.compile rows only for {', '.join(UNTIMED_COMPILE)} (each compile "
                        "takes 5-20 s here); the timed run compiles every op")
        reason = request.getfixturevalue("inductor")
        if reason is not None:
            pytest.skip(reason)
    d = request.getfixturevalue("cuda_data" if variant == "triton" else "cpu_data")
    names, mutated, hp = OPS[op]
    # in-place ops get private copies so that every variant sees comparable values
    args = [getattr(d, n).clone() if n in mutated else getattr(d, n) for n in names]
    if variant.startswith("torch.compile"):
        compiled = torch.compile(getattr(reference, op), dynamic=False)
        fn = lambda: compiled(*args, **hp)  # noqa: E731
    else:
        public = getattr(kernels, op)
        fn = lambda: public(*args, **hp, backend=variant)  # noqa: E731
    benchmark.group = op
    got = _run(benchmark, fn, args[0].device, timed, slow=variant == "reference" and op.startswith("inner_adamw"))
    _record(benchmark, op, d.n, timed)
    if not timed:  # the single untimed call doubles as a check of every row against the reference
        ref_args = [getattr(d, n).clone() if n in mutated else getattr(d, n) for n in names]
        want = getattr(reference, op)(*ref_args, **hp)
        pairs = (zip(_tuple(got), _tuple(want)) if want is not None
                 else [(a, r) for n, a, r in zip(names, args, ref_args) if n in mutated])
        for g, w in pairs:
            torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-4, atol=1e-5)


def test_torch_fused_adamw(benchmark, timed, cpu_data):
    """torch.optim.AdamW(fused=True): the same update as adamw_step_ (28 B/element), the bar to meet."""
    d = cpu_data
    p = d.p.clone().requires_grad_()
    p.grad = d.g.clone()
    opt = torch.optim.AdamW([p], lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"], fused=True)
    benchmark.group = "adamw_step_"
    _run(benchmark, opt.step, p.device, timed)
    _record(benchmark, "adamw_step_", d.n, timed)


def test_copy(benchmark, timed, cpu_data):
    """dst.copy_(src): 8 B/element, the practical bandwidth floor of every elementwise kernel."""
    benchmark.group = "copy"
    _run(benchmark, lambda: cpu_data.dst.copy_(cpu_data.p), cpu_data.p.device, timed)
    _record(benchmark, "copy", cpu_data.n, timed)
