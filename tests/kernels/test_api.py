"""The public API around the numerics: backend choice, input validation, torch.library registration
(opcheck), the SIMD variant selection of the C++ library and the fallback when it is missing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mamlen import kernels
from mamlen.kernels import _dispatch

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)


def vecs(n=10, dtype=torch.float32, k=4):
    return [torch.randn(n, dtype=dtype) for _ in range(k)]


def test_public_functions_and_backend_for():
    for name in ("inner_adamw_forward", "inner_adamw_adjoint", "adamw_step_", "inner_sgd_forward",
                 "inner_sgd_adjoint", "sgd_step_", "fd_perturb", "fd_combine_", "backend_for"):
        assert callable(getattr(kernels, name)), name
    expected = "cpp" if kernels.CPP_AVAILABLE else "reference"
    assert kernels.backend_for(torch.zeros(3)) == expected
    assert kernels.backend_for(torch.zeros(3, device="meta")) == "reference"
    assert kernels.state_dtype(torch.bfloat16) == torch.float32
    assert kernels.state_dtype(torch.float64) == torch.float64


def test_default_backend_is_cpp_on_cpu():
    assert kernels.CPP_AVAILABLE or os.environ.get("MAMLEN_NO_CPP") == "1", _dispatch._CPP_ERROR


# ---- validation: each error names the function and the argument ----------------------------------------

def _fwd(p, g, m, v, **kw):
    return kernels.inner_adamw_forward(p, g, m, v, **{**HP, **kw})


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_tensors_are_rejected_with_the_argument_named(backend):
    if backend == "cpp" and not kernels.CPP_AVAILABLE:
        pytest.skip("C++ kernels not built")
    p, g, m, v = vecs()
    cases = [
        (lambda: _fwd(torch.randn(20)[::2], g, m, v, backend=backend), ValueError, "'p' must be contiguous"),
        (lambda: _fwd(p, g.view(2, 5), m, v, backend=backend), ValueError, "'g' must be a flat 1-D"),
        (lambda: _fwd(p, g, m[:9], v, backend=backend), ValueError, "'m' has 9 elements but 'p' has 10"),
        (lambda: _fwd(p, g, m, v.double(), backend=backend), TypeError, "'v' must have the state dtype"),
        (lambda: _fwd(p, g.double(), m, v, backend=backend), TypeError, "'g' has dtype torch.float64 but 'p'"),
        (lambda: _fwd(p.half(), g.half(), m, v, backend=backend), TypeError, "'p' has dtype torch.float16"),
        (lambda: _fwd(p.bfloat16(), g.bfloat16(), m.bfloat16(), v, backend=backend), TypeError,
         "'m' must have the state dtype torch.float32"),
        (lambda: _fwd(p, g, m, v.to("meta"), backend=backend), ValueError, "'v' is on meta but 'p' is on cpu"),
        (lambda: _fwd(p, g, m, [0.0] * 10, backend=backend), TypeError, "'v' must be a torch.Tensor"),
        (lambda: kernels.fd_combine_(m.double(), g, p, 1.0, backend=backend), TypeError,
         "'acc' must have the state dtype torch.float32"),
        (lambda: kernels.inner_sgd_adjoint(p.bfloat16(), lr=0.1, weight_decay=0.0, backend=backend),
         TypeError, "'p_bar' must have the state dtype torch.float32"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace("[", r"\[")):
            call()


def test_bad_hyperparameters_are_rejected():
    p, g, m, v = vecs()
    for kw, msg in [({"beta1": 1.0}, "beta1 must satisfy 0 <= beta1 < 1, got 1.0"),
                    ({"beta2": -0.1}, "beta2 must satisfy"),
                    ({"eps": -1e-8}, "eps must be >= 0"),
                    ({"step": 0}, "step .* must be an int >= 1, got 0"),
                    ({"step": 1.5}, "step .* must be an int >= 1, got 1.5"),
                    ({"lr": "0.1"}, "lr must be a Python float"),
                    ({"beta1": torch.tensor(0.9)}, "beta1 must be a Python float, got Tensor"),
                    ({"weight_decay": float("nan")}, "weight_decay must be finite")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            _fwd(p, g, m, v, **kw)


def test_fd_scalars_are_checked_by_name():
    p, g, m, _ = vecs()
    with pytest.raises(TypeError, match="fd_perturb: r must be a Python float"):
        kernels.fd_perturb(p, m, None)
    with pytest.raises(ValueError, match="fd_combine_: scale must be finite"):
        kernels.fd_combine_(m, p, g, float("inf"))


def test_unknown_or_unavailable_backend_is_named():
    p, g, m, v = vecs()
    with pytest.raises(ValueError, match="backend must be None or one of"):
        _fwd(p, g, m, v, backend="cuda")
    meta = [t.to("meta") for t in (p, g, m, v)]
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available for device meta"):
        _fwd(*meta, backend="cpp")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available for device meta"):
        _fwd(*meta, backend="triton")


def test_cpp_ops_check_their_inputs_when_called_directly():
    if not kernels.CPP_AVAILABLE:
        pytest.skip("C++ kernels not built")
    p, g, m, v = vecs()
    op = torch.ops.mamlen.inner_adamw_forward
    with pytest.raises(RuntimeError, match="inner_adamw_forward: argument 'm' must be contiguous"):
        op(p, g, torch.randn(20)[::2], v, **HP)
    with pytest.raises(RuntimeError, match="argument 'v' must have dtype Double"):
        op(p.double(), g.double(), m.double(), v, **HP)
    with pytest.raises(RuntimeError, match="step .* must be >= 1, got 0"):
        op(p, g, m, v, **{**HP, "step": 0})
    with pytest.raises(RuntimeError, match="fd_combine_: argument 'g_minus' has 9 elements, expected 10"):
        torch.ops.mamlen.fd_combine_(m, g, p[:9], 1.0)


# ---- torch.library registration ------------------------------------------------------------------------

def _opcheck_cases():
    p, g, m, v = vecs(37)
    v = v.abs()  # a second moment: negative values would give NaN, which never compares equal
    pb = vecs(37, torch.bfloat16, 2)
    return {
        "inner_adamw_forward": [((p, g, m, v), HP), ((*pb, m, v), HP)],
        "inner_adamw_adjoint": [((p, m, v, g, m, v), HP)],
        "adamw_step_": [((p.clone(), g, m.clone(), v.clone()), HP)],
        "inner_sgd_forward": [((p, g), dict(lr=0.1, weight_decay=0.01))],
        "inner_sgd_adjoint": [((p,), dict(lr=0.1, weight_decay=0.01))],
        "sgd_step_": [((p.clone(), g, m.clone(), v.clone()), dict(lr=0.1, beta1=0.9, beta2=0.99,
                                                                    weight_decay=0.01))],
        "fd_perturb": [((p, m, 0.1), {}), ((pb[0], m, 0.1), {})],
        "fd_combine_": [((p.clone(), g, m, 0.5), {}), ((p.clone(), *pb, 0.5), {})],
        "inner_adamw_forward_out": [((p, g, m, v, *(torch.empty_like(m) for _ in range(3))), HP)],
        "inner_adamw_adjoint_out": [((p, m, v, g, m, v, *(torch.empty_like(m) for _ in range(4))), HP)],
        "fd_perturb_out": [((p, m, torch.empty_like(p), torch.empty_like(p), 0.1), {})],
    }


@pytest.mark.parametrize("name", list(_dispatch.SCHEMAS))
def test_opcheck(name):
    """Schema, fake (meta) kernel, and AOT-dispatch checks of each registered op on its CPU kernel."""
    if not kernels.CPP_AVAILABLE:
        pytest.skip("the CPU kernels of the ops come from the C++ library")
    for args, kwargs in _opcheck_cases()[name]:
        torch.library.opcheck(_dispatch.op(name), args, kwargs)


def test_ops_trace_under_torch_compile():
    if not kernels.CPP_AVAILABLE:
        pytest.skip("C++ kernels not built")
    p, g, m, v = vecs(100)
    v = v.abs()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(p, g, m, v):
        p2, m2, v2 = torch.ops.mamlen.inner_adamw_forward(p, g, m, v, **HP)
        return p2 * 2, m2, v2

    got = step(p, g, m, v)
    want = kernels.inner_adamw_forward(p, g, m, v, **HP, backend="reference")
    torch.testing.assert_close(got[0], want[0] * 2)
    torch.testing.assert_close(got[1:], want[1:])


# ---- C++ library: SIMD variants and fallback -----------------------------------------------------------

def _normwise_close(x, y, tol, what):
    # max-norm check (two reductions): enough to tell a broken variant; exact tolerances: test_numerics.py
    assert x.dtype == y.dtype and x.shape == y.shape, what
    err, scale = float((x - y).abs().max()), float(y.abs().max())
    assert err <= tol * scale + 1e-30, f"{what}: max error {err:.3g} > {tol:g} x max {scale:.3g}"


def _check_ops_against_reference():
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=2)
    for dtype, n in ((torch.float32, 1037), (torch.float64, 1037), (torch.bfloat16, 1037),
                     (torch.float32, (1 << 20) + 3)):  # several chunks, streaming stores
        sd = kernels.state_dtype(dtype)
        p, g = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        m, v = torch.randn(n, dtype=sd), torch.rand(n, dtype=sd)
        v[::7] = 0
        g[::7] = 0
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        calls = {
            "inner_adamw_forward": ((p, g, m, v), hp),
            "inner_adamw_adjoint": ((m, m, v, g, m, v), hp),
            "inner_sgd_forward": ((p, g), dict(lr=0.1, weight_decay=0.01)),
            "fd_perturb": ((p, m, 0.3), {}),
        }
        if dtype != torch.bfloat16:
            calls["inner_sgd_adjoint"] = ((p, ), dict(lr=0.1, weight_decay=0.01))
        if n > 1 << 20:  # the large case exercises chunking + streaming stores: two ops suffice
            calls = {k: calls[k] for k in ("inner_adamw_forward", "inner_adamw_adjoint")}
        for name, (args, kw) in calls.items():
            got = getattr(kernels, name)(*args, **kw, backend="cpp")
            want = getattr(kernels, name)(*args, **kw, backend="reference")
            if isinstance(got, torch.Tensor):
                got, want = (got,), (want,)
            for x, y in zip(got, want, strict=True):
                _normwise_close(x, y, tol, f"{name} {dtype} n={n}")
        if n > 1 << 20:
            continue
        for name, args, kw in (("adamw_step_", (p, g, m, v), hp),
                               ("sgd_step_", (p, g, m, v), dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)),
                               ("fd_combine_", (m, p, g, 0.5), {})):
            mine = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
            ref = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
            getattr(kernels, name)(*mine, **kw, backend="cpp")
            getattr(kernels, name)(*ref, **kw, backend="reference")
            for x, y in zip(mine, ref):
                if isinstance(x, torch.Tensor):
                    _normwise_close(x, y, tol, f"{name} {dtype} n={n}")


def test_every_simd_variant_is_correct():
    """All SIMD builds this CPU can run (switched in-process), every op, against the reference."""
    if not kernels.CPP_AVAILABLE:
        pytest.skip("C++ kernels not built")
    info = torch.ops.mamlen_info
    start = info.cpu_variant()
    tried = []
    try:
        for variant in ("avx512", "avx2", "default"):
            try:
                info.set_cpu_variant(variant)
            except RuntimeError as e:
                assert "not available on this build/CPU" in str(e)
                continue
            assert info.cpu_variant() == variant
            _check_ops_against_reference()
            tried.append(variant)
    finally:
        info.set_cpu_variant(start)
    assert "default" in tried and start in tried, tried


def test_startup_variant_follows_torch_cpu_capability():
    """ATEN_CPU_CAPABILITY lowers torch's capability, and with it the variant picked at load time."""
    if not kernels.CPP_AVAILABLE:
        pytest.skip("C++ kernels not built")
    out = _run("import torch\nfrom mamlen import kernels\nprint(torch.ops.mamlen_info.cpu_variant())",
               ATEN_CPU_CAPABILITY="default")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "default"


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_missing_library_falls_back_with_one_warning():
    code = textwrap.dedent("""
        import importlib.util, warnings, torch
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "mamlen.kernels._C" else real(name, *a)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from mamlen import kernels
            p, g, m, v = (torch.randn(5) for _ in range(4))
            out = kernels.inner_adamw_forward(p, g, m, v.abs(), lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                                              weight_decay=0.0, step=1)
        mine = [str(w.message) for w in caught if "C++ kernels unavailable" in str(w.message)]
        assert len(mine) == 1 and "mamlen.kernels._C not found" in mine[0], mine
        print(kernels.backend_for(p))
        try:
            kernels.fd_combine_(p, g, m, 1.0, backend="cpp")
        except RuntimeError as e:
            print(e)
    """)
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "reference"
    assert "backend 'cpp' is not available for device cpu: mamlen.kernels._C not found" in lines[1]


def test_triton_kernels_are_the_cuda_kernels_of_the_ops():
    pytest.importorskip("triton")
    import mamlen.kernels.triton  # noqa: F401  (registers on import)
    for name in _dispatch.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mamlen::{name}", "CUDA"), name
        if kernels.CPP_AVAILABLE:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mamlen::{name}", "CPU"), name
