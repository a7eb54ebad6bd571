"""GPU kernels (Triton). Imported lazily by the backends that use them."""
