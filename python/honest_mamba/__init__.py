"""The second seed's import name (`from honest_mamba import HybridMambaConfig, HybridMambaModel`):
the same package as hybrid_mamba."""
from hybrid_mamba import *  # noqa: F401,F403
from hybrid_mamba import __all__, __version__  # noqa: F401
