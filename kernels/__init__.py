"""Fused elementwise kernels of the meta-step: one torch.library op per stage (`mamlen::<name>`).

Variants: `reference` (plain torch, kernels/reference.py, the truth), `cpp` (kernels/csrc, OpenMP + SIMD,
built by CMakeLists.txt during `pip install -e .` and loaded here; absent → one warning and the reference
is used), `triton` (kernels/triton, the CUDA kernels). The input device picks the variant (`backend_for`);
every function takes `backend=` to force one. Conventions and formulas: the docstrings of `adamw`, `sgd`,
`fd` and ../shared/DESIGN.md.

The ops are not differentiable by autograd: the meta-gradient is computed with the explicit adjoints
(`inner_adamw_adjoint`, `inner_sgd_adjoint`); differentiate through `reference` if autograd is needed.
"""
from mamlen.kernels._dispatch import BACKENDS, CPP_AVAILABLE, backend_for
from mamlen.kernels.adamw import adamw_step_, inner_adamw_adjoint, inner_adamw_forward
from mamlen.kernels.fd import fd_combine_, fd_perturb
from mamlen.kernels.reference import state_dtype
from mamlen.kernels.sgd import inner_sgd_adjoint, inner_sgd_forward, sgd_step_

__all__ = [
    "BACKENDS", "CPP_AVAILABLE", "backend_for", "state_dtype",
    "inner_adamw_forward", "inner_adamw_adjoint", "adamw_step_",
    "inner_sgd_forward", "inner_sgd_adjoint", "sgd_step_",
    "fd_perturb", "fd_combine_",
]
