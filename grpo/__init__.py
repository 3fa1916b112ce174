"""mlx-grpo: Group Relative Policy Optimization on Apple MLX."""

from grpo._blas import STATUS as _BLAS_STATUS
from grpo._blas import load_fast_blas as _load_fast_blas

_load_fast_blas()  # must run before the first `import mlx.core`

__version__ = "0.1.0"


def blas_info() -> dict:
    """Which BLAS mlx uses in this process: ``{"backend", "library", "reason"}``."""
    return dict(_BLAS_STATUS)
