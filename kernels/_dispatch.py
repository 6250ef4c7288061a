"""The torch.library ops of mamlen.kernels, the choice of backend per call, and input validation.

Each fused stage is one op `mamlen::<name>` whose schema is defined here (so the op exists even without the
C++ library); its CPU kernel comes from the C++ library `mamlen.kernels._C` (kernels/csrc, loaded below),
its CUDA kernel from Triton (kernels/triton, registered when CUDA is present). The public functions pick:

    backend_for(t) = "cpp"       t on CPU and the C++ library loaded
                     "triton"    t on CUDA and triton importable
                     "reference" otherwise (plain torch, kernels/reference.py)

`backend=` forces a variant; "triton" on CPU tensors runs the launchers directly under TRITON_INTERPRET=1.
"""
import importlib.util
import math
import os
import warnings

import torch

from mamlen.kernels import reference

BACKENDS = ("reference", "cpp", "triton")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_HP_ADAMW = "float lr, float beta1, float beta2, float eps, float weight_decay, int step"
SCHEMAS = {
    "inner_adamw_forward": f"(Tensor p, Tensor g, Tensor m, Tensor v, *, {_HP_ADAMW}) -> (Tensor, Tensor, Tensor)",
    "inner_adamw_adjoint": (f"(Tensor p_bar, Tensor m_bar, Tensor v_bar, Tensor g, Tensor m_new, Tensor v_new, *, "
                            f"{_HP_ADAMW}) -> (Tensor, Tensor, Tensor, Tensor)"),
    "adamw_step_": f"(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) v, *, {_HP_ADAMW}) -> ()",
    "inner_sgd_forward": "(Tensor p, Tensor g, *, float lr, float weight_decay) -> Tensor",
    "inner_sgd_adjoint": "(Tensor p_bar, *, float lr, float weight_decay) -> (Tensor, Tensor)",
    "sgd_step_": ("(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) v, *, float lr, float beta1, float beta2, "
                  "float weight_decay) -> ()"),
    "fd_perturb": "(Tensor p, Tensor d, float r) -> (Tensor, Tensor)",
    "fd_combine_": "(Tensor(a!) acc, Tensor g_plus, Tensor g_minus, float scale) -> ()",
    # `out=` forms: write into caller buffers, which may be the inputs themselves (lane-wise in place)
    "inner_adamw_forward_out": (f"(Tensor p, Tensor g, Tensor m, Tensor v, Tensor(a!) p_out, Tensor(b!) m_out, "
                                f"Tensor(c!) v_out, *, {_HP_ADAMW}) -> ()"),
    "inner_adamw_adjoint_out": (f"(Tensor p_bar, Tensor m_bar, Tensor v_bar, Tensor g, Tensor m_new, Tensor v_new, "
                                f"Tensor(a!) g_bar_out, Tensor(b!) p_bar_out, Tensor(c!) m_bar_out, "
                                f"Tensor(d!) v_bar_out, *, {_HP_ADAMW}) -> ()"),
    "fd_perturb_out": "(Tensor p, Tensor d, Tensor(a!) plus_out, Tensor(b!) minus_out, float r) -> ()",
}

_LIB = torch.library.Library("mamlen", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


def op(name):
    """The registered torch.library op `mamlen::<name>` (an OpOverloadPacket)."""
    return getattr(torch.ops.mamlen, name)


# fake (meta) kernels: output shapes/dtypes only, so the ops trace under torch.compile and pass opcheck
def _sd(t):
    return reference.state_dtype(t.dtype)


@torch.library.register_fake("mamlen::inner_adamw_forward")
def _(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    return torch.empty_like(p), torch.empty_like(m), torch.empty_like(v)


@torch.library.register_fake("mamlen::inner_adamw_adjoint")
def _(p_bar, m_bar, v_bar, g, m_new, v_new, *, lr, beta1, beta2, eps, weight_decay, step):
    return tuple(torch.empty_like(p_bar, dtype=_sd(g)) for _ in range(4))


@torch.library.register_fake("mamlen::adamw_step_")
def _(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    return None


@torch.library.register_fake("mamlen::inner_sgd_forward")
def _(p, g, *, lr, weight_decay):
    return torch.empty_like(p)


@torch.library.register_fake("mamlen::inner_sgd_adjoint")
def _(p_bar, *, lr, weight_decay):
    return torch.empty_like(p_bar), torch.empty_like(p_bar)


@torch.library.register_fake("mamlen::sgd_step_")
def _(p, g, m, v, *, lr, beta1, beta2, weight_decay):
    return None


@torch.library.register_fake("mamlen::fd_perturb")
def _(p, d, r):
    return torch.empty_like(p), torch.empty_like(p)


@torch.library.register_fake("mamlen::fd_combine_")
def _(acc, g_plus, g_minus, scale):
    return None


for _name in ("inner_adamw_forward_out", "inner_adamw_adjoint_out", "fd_perturb_out"):
    torch.library.register_fake(f"mamlen::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------------------------------------------------
# the C++ library: loaded on import if built, checked by running an op once (a broken build falls back too)
def _load_cpp():
    spec = importlib.util.find_spec("mamlen.kernels._C")
    if spec is None or spec.origin is None:
        return "mamlen.kernels._C not found (build it with `pip install --no-build-isolation -e .`)"
    try:
        torch.ops.load_library(spec.origin)
        acc = torch.zeros(3)
        op("fd_combine_")(acc, torch.full((3,), 2.0), torch.ones(3), 0.5)
        if not torch.equal(acc, torch.full((3,), 0.5)):
            return f"{spec.origin} loaded but its fd_combine_ computed {acc.tolist()} instead of [0.5, 0.5, 0.5]"
    except (OSError, RuntimeError, NotImplementedError) as e:
        return f"{spec.origin} failed to load or run: {str(e).splitlines()[0]}"
    return None


if os.environ.get("MAMLEN_NO_CPP") == "1":
    _CPP_ERROR = "disabled by MAMLEN_NO_CPP=1"
else:
    _CPP_ERROR = _load_cpp()
    if _CPP_ERROR is not None:
        warnings.warn(f"mamlen.kernels: C++ kernels unavailable, CPU calls use the reference ops: {_CPP_ERROR}",
                      RuntimeWarning, stacklevel=2)
CPP_AVAILABLE = _CPP_ERROR is None

_TRITON = None  # the module mamlen.kernels.triton once imported, False if triton is missing


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            import mamlen.kernels.triton as tr  # imports triton; registers the CUDA kernels of the ops
            _TRITON = tr
        except (ImportError, RuntimeError, OSError):  # missing or broken triton: no Triton variant
            _TRITON = False
    return _TRITON


if torch.cuda.is_available():
    _triton()


def _available(backend, device):
    if backend == "reference":
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, "the C++ kernels run on CPU tensors only"
        return CPP_AVAILABLE, _CPP_ERROR or ""
    if device.type == "cuda":
        return bool(_triton()), "triton is not importable"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        tr = _triton()
        if not tr:
            return False, "triton is not importable"
        return tr.ops.INTERPRETED, "mamlen.kernels.triton was imported before TRITON_INTERPRET=1 was set"
    return False, "triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)"


def _default_backend(device: torch.device) -> str:
    if device.type == "cpu" and CPP_AVAILABLE:
        return "cpp"
    if device.type == "cuda" and _triton():
        return "triton"
    return "reference"


def backend_for(tensor: torch.Tensor) -> str:
    """The variant a call on `tensor` would use by default: "cpp" | "triton" | "reference"."""
    return _default_backend(tensor.device)


def call(name, backend, device, *args, **kwargs):
    """Run stage `name` with the requested (or default) backend on inputs that live on `device`."""
    if backend is None:
        backend = _default_backend(device)
    elif backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be None or one of {BACKENDS}, got {backend!r}")
    else:
        ok, why = _available(backend, device)
        if not ok:
            raise RuntimeError(f"{name}: backend {backend!r} is not available for device {device}: {why}")
    if backend == "reference":
        return getattr(reference, name)(*args, **kwargs)
    if backend == "triton" and device.type != "cuda":
        return getattr(_triton(), name)(*args, **kwargs)  # interpreter: call the launcher directly
    return op(name)(*args, **kwargs)  # the dispatcher routes CPU → C++, CUDA → Triton


# ---------------------------------------------------------------------------------------------------------
# validation: every error names the function, the argument and what was wrong
def check_vectors(fn, **tensors):
    """Each tensor is 1-D and contiguous; all have the first one's numel and device."""
    first_name, first = None, None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{fn}: argument '{name}' must be a flat 1-D tensor, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: argument '{name}' must be contiguous, got stride {t.stride()}")
        if first is None:
            first_name, first = name, t
            continue
        if t.numel() != first.numel():
            raise ValueError(f"{fn}: argument '{name}' has {t.numel()} elements but '{first_name}' has "
                             f"{first.numel()}")
        if t.device != first.device:
            raise ValueError(f"{fn}: argument '{name}' is on {t.device} but '{first_name}' is on {first.device}")
    return first.device


def check_out(fn, out, dtypes, like, inputs):
    """`out` is a tuple of len(dtypes) flat contiguous tensors shaped like `like`, of those dtypes, each either
    one of `inputs` exactly (in place) or disjoint from every input (a partial overlap would read lanes
    already written)."""
    if not isinstance(out, (tuple, list)) or len(out) != len(dtypes):
        raise TypeError(f"{fn}: out must be a tuple of {len(dtypes)} tensors, got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    for k, (t, dt) in enumerate(zip(out, dtypes)):
        name = f"out[{k}]"
        check_vectors(fn, like=like, **{name: t})
        if t.dtype != dt:
            raise TypeError(f"{fn}: argument '{name}' must have dtype {dt}, got {t.dtype}")
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        for in_name, x in inputs.items():
            xlo, xhi = x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
            same = xlo == lo and x.dtype == t.dtype
            if not same and lo < xhi and xlo < hi and t.numel():
                raise ValueError(f"{fn}: argument '{name}' overlaps input '{in_name}' without being it; "
                                 "an output must be an input exactly or disjoint from all inputs")
        for j in range(k):
            if out[j].data_ptr() == lo and t.numel():
                raise ValueError(f"{fn}: out[{j}] and out[{k}] are the same buffer")
    return tuple(out)


def check_param_dtype(fn, names, *tensors):
    """The tensors share one parameter dtype among float32, float64, bfloat16; returns it."""
    dtype = tensors[0].dtype
    if dtype not in _DTYPES:
        raise TypeError(f"{fn}: argument '{names[0]}' has dtype {dtype}; supported: float32, float64, bfloat16")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != dtype:
            raise TypeError(f"{fn}: argument '{name}' has dtype {t.dtype} but '{names[0]}' has {dtype} "
                            f"(they must match)")
    return dtype


def check_state_dtype(fn, param_dtype, **tensors):
    """State tensors (moments, adjoints, accumulators) have dtype promote(param dtype, float32)."""
    sd = reference.state_dtype(param_dtype)
    for name, t in tensors.items():
        if t.dtype != sd:
            raise TypeError(f"{fn}: argument '{name}' must have the state dtype {sd} of {param_dtype} "
                            f"parameters, got {t.dtype}")


def check_floats(fn, **values):
    """Scalars travel as schema `float`s: Python ints/floats only (not tensors, whose .item() would sync)."""
    for name, x in values.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{fn}: {name} must be a Python float, got {type(x).__name__}")
        if not math.isfinite(x):
            raise ValueError(f"{fn}: {name} must be finite, got {x}")


def check_hparams(fn, *, lr=0.0, weight_decay=0.0, beta1=None, beta2=None, eps=None, step=None):
    check_floats(fn, lr=lr, weight_decay=weight_decay,
                 **{k: x for k, x in (("beta1", beta1), ("beta2", beta2), ("eps", eps)) if x is not None})
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"{fn}: {name} must satisfy 0 <= {name} < 1, got {beta}")
    if eps is not None and not eps >= 0.0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ValueError(f"{fn}: step (the bias-correction count τ) must be an int >= 1, got {step!r}")
