"""The Wan family (DESIGN 10): Wan2.1 and Wan2.2, text- and image-to-video, on diffusers' WanTransformer3DModel."""

from .. import register
from .adapter import WanFamily

WAN = register(WanFamily())
