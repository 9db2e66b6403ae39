"""freeloc_dist: training-free long-video rendering with FreeLOC on diffusers' Wan, across many GPUs."""

from .install import apply_freeloc
from .profile import Profile, load_profile

__version__ = "0.1.0"
__all__ = ["apply_freeloc", "load_profile", "Profile", "__version__"]
