"""The Triton (CUDA) variant of the mamlen ops: kernels and launchers in `ops.py`, registered here as the
CUDA kernels of the torch.library ops `mamlen::<name>` (so a call on CUDA tensors dispatches to them).

Importing this module imports triton (which works without CUDA); `mamlen.kernels` imports it lazily: when
CUDA is present, or when a caller forces backend="triton" (CPU tensors then need TRITON_INTERPRET=1 set
before triton is first imported).
"""
import torch

from mamlen.kernels.triton import ops
from mamlen.kernels.triton.ops import (adamw_step_, fd_combine_, fd_perturb, fd_perturb_out, inner_adamw_adjoint,
                                       inner_adamw_adjoint_out, inner_adamw_forward, inner_adamw_forward_out,
                                       inner_sgd_adjoint, inner_sgd_forward, sgd_step_)

NAMES = ("inner_adamw_forward", "inner_adamw_adjoint", "adamw_step_", "inner_sgd_forward", "inner_sgd_adjoint",
         "sgd_step_", "fd_perturb", "fd_combine_", "inner_adamw_forward_out", "inner_adamw_adjoint_out",
         "fd_perturb_out")

for _name in NAMES:
    torch.library.register_kernel(f"mamlen::{_name}", "cuda", getattr(ops, _name))

__all__ = list(NAMES)
