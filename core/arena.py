"""Flat parameter arena: a model's trainable parameters packed into one contiguous buffer per dtype.

After `ParamArena(model)`, every trainable `Parameter.data` is a view into `arena.flats[i]`, so an in-place
update of the flat buffer (the fused outer step) *is* the model update, and every elementwise stage of the
meta-step is one pass over one buffer. `arena.bind(flats)` temporarily makes the model compute with other
flat tensors (adapted weights φ, possibly requiring grad or carrying forward-mode tangents) by swapping the
modules' `_parameters` entries for views of them; tied parameters (GPT-2's wte / lm_head) are one entry.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Slot:
    flat: int        # which flat buffer
    offset: int
    numel: int
    shape: torch.Size


class ParamArena:
    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # ties appear once
        if not named:
            raise ValueError("ParamArena: the model has no trainable parameters")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"ParamArena: parameters span several devices {sorted(map(str, devices))}; "
                             "the meta-engine needs them on one device")
        self.device = devices.pop()
        self.dtypes: list[torch.dtype] = []
        self.names: list[list[str]] = []      # per flat buffer, in packing order
        self.slots: dict[str, _Slot] = {}
        for name, p in named:
            if p.dtype not in self.dtypes:
                self.dtypes.append(p.dtype)
                self.names.append([])
            self.names[self.dtypes.index(p.dtype)].append(name)
        params = dict(named)
        self.flats: list[torch.Tensor] = []
        for i, dtype in enumerate(self.dtypes):
            total = sum(params[n].numel() for n in self.names[i])
            flat = torch.empty(total, dtype=dtype, device=self.device)
            off = 0
            for n in self.names[i]:
                p = params[n]
                flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
                self.slots[n] = _Slot(i, off, p.numel(), p.shape)
                p.data = flat[off:off + p.numel()].view(p.shape)
                off += p.numel()
            self.flats.append(flat)
        self.params = params
        # every (module, attribute) that holds one of our parameters: tied weights appear several times
        by_id = {id(p): n for n, p in named}
        self._holders = [(mod, key, by_id[id(p)]) for mod in model.modules()
                         for key, p in mod._parameters.items() if p is not None and id(p) in by_id]

    # -- buffers -----------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(f.numel() for f in self.flats)

    def new(self, dtype_fn=None, fill=None) -> list[torch.Tensor]:
        """One fresh buffer per arena (dtype = dtype_fn(param dtype) or the param dtype), zeros or `fill`."""
        out = []
        for f in self.flats:
            dt = dtype_fn(f.dtype) if dtype_fn else f.dtype
            out.append(torch.zeros(f.numel(), dtype=dt, device=f.device) if fill is None
                       else torch.full((f.numel(),), fill, dtype=dt, device=f.device))
        return out

    def views(self, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{param name: view of `flats` shaped like that parameter}, in packing order."""
        out = {}
        for i, flat in enumerate(flats):
            # one split, not one slice per parameter: a slice's backward materialises a zero tensor the size of
            # the whole buffer per parameter (measured: ~70% of an exact meta-step), split's backward is one cat
            sizes = [self.slots[n].numel for n in self.names[i]]
            for n, chunk in zip(self.names[i], flat.split(sizes)):
                out[n] = chunk.view(self.slots[n].shape)
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], dtype_fn=None) -> list[torch.Tensor]:
        """Pack {name: tensor} (same shapes as the parameters) into fresh flat buffers."""
        missing = [n for n in self.slots if n not in tensors]
        extra = [n for n in tensors if n not in self.slots]
        if missing or extra:
            raise KeyError(f"ParamArena.flatten: missing {missing[:5]}, unexpected {extra[:5]}")
        out = self.new(dtype_fn)
        for n, s in self.slots.items():
            t = tensors[n]
            if t.shape != s.shape:
                raise ValueError(f"ParamArena.flatten: {n} has shape {tuple(t.shape)}, expected {tuple(s.shape)}")
            out[s.flat][s.offset:s.offset + s.numel].copy_(t.reshape(-1))
        return out

    def check_bound(self):
        """Raise if something replaced a parameter's storage (e.g. `model.to()`), which would detach it from
        the arena and make outer updates silently miss the model."""
        for n, p in self.params.items():
            s = self.slots[n]
            want = self.flats[s.flat][s.offset:s.offset + s.numel]
            if p.data_ptr() != want.data_ptr() or p.dtype != want.dtype:
                raise RuntimeError(f"parameter {n!r} no longer lives in the meta-engine's flat buffer (was the model "
                                   "moved or its parameters replaced after MetaEngine was built?); build a new "
                                   "MetaEngine after moving the model")

    # -- binding ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bind(self, flats):
        """Make the model compute with views of `flats` (flat buffers, or {name: tensor} shaped like the
        parameters, e.g. one autograd leaf per parameter) instead of its parameters, for the duration.

        Backward passes that may recompute activations (checkpointing) must run inside the same `bind`.
        A flat wider than its parameters' dtype (float32 φ of bfloat16 parameters) is seen by the model through a
        differentiable cast to that dtype; the views yielded (what derivatives are taken against) stay uncast."""
        views = dict(flats) if isinstance(flats, dict) else self.views(flats)
        seen = {n: v if v.dtype == self.dtypes[self.slots[n].flat] else v.to(self.dtypes[self.slots[n].flat])
                for n, v in views.items()}  # one cast per name: tied parameters stay one tensor
        saved = [(mod, key, mod._parameters[key]) for mod, key, _ in self._holders]
        try:
            for mod, key, name in self._holders:
                mod._parameters[key] = seen[name]  # plain tensor in the dict: no Parameter checks, no copy
            yield views
        finally:
            for mod, key, p in saved:
                mod._parameters[key] = p
