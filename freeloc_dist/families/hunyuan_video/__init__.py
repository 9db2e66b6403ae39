"""The HunyuanVideo family (DESIGN 11): HunyuanVideo text-to-video on diffusers' HunyuanVideoTransformer3DModel."""

from .. import register
from .adapter import HunyuanVideoFamily

HUNYUAN_VIDEO = register(HunyuanVideoFamily())
