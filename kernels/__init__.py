"""Fused elementwise kernels of the meta-step (reference torch, C++ on CPU, Triton on GPU)."""
