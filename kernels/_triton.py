"""triton and triton.language for the kernel files, or a stand-in where triton is not installed.

A CPU-only install (torch's CPU wheel brings no triton) must still import kernels/ for the PyTorch twins. The stand-in
only lets the `@triton.jit` definitions and their `tl.constexpr` annotations load; kernels/__init__.py never sends
a tensor to a launcher when HAS_TRITON is False.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

__all__ = ["HAS_TRITON", "tl", "triton"]
