"""A fix for Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied by the ``triton`` backend before it runs.

The interpreter stores bfloat16 values as raw uint16 and its ``tl.dot`` multiplies those integers
(seen in triton 3.6 to 3.9), so bf16 products come out as nonsense (log-probs near -7e9). This wraps
``create_dot`` to widen bf16 operands held as uint16 bits to float32 first, which is what the tensor
cores compute (exact products, float32 accumulation); operands the interpreter holds otherwise (a
fixed release) pass through. It touches only the interpreter; compiled GPU kernels are unaffected.
"""

from __future__ import annotations

import numpy as np


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def patch_bf16_dot() -> None:
    """Wrap the interpreter's ``create_dot`` (idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_widens_bf16", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16 and a.data.dtype == np.uint16:
            a = interpreter.TensorHandle(_bf16_bits_to_float32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16 and b.data.dtype == np.uint16:
            b = interpreter.TensorHandle(_bf16_bits_to_float32(b.data), tl.float32)
        return original(self, a, b, d, *args, **kwargs)

    create_dot._widens_bf16 = True
    builder.create_dot = create_dot
