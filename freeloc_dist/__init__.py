"""freeloc_dist: training-free long-video rendering with FreeLOC on diffusers' Wan, across many GPUs.

Imports are lazy so that `freeloc_dist.config` (used to reject bad input early) does not pay for
importing diffusers.
"""

__version__ = "0.1.0"
__all__ = ["apply_freeloc", "remove_freeloc", "enable_freeloc", "parallelize_pipeline", "load_profile", "Profile",
           "__version__"]


def __getattr__(name):
    if name in ("apply_freeloc", "remove_freeloc"):
        from . import install

        return getattr(install, name)
    if name in ("enable_freeloc", "parallelize_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("load_profile", "Profile"):
        from . import profile

        return getattr(profile, name)
    raise AttributeError(f"module 'freeloc_dist' has no attribute {name!r}")
