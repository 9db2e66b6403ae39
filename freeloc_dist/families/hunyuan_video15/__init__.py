"""The HunyuanVideo 1.5 family (DESIGN 11): text- and image-to-video on diffusers' HunyuanVideo15Transformer3DModel."""

from .. import register
from .adapter import HunyuanVideo15Family

HUNYUAN_VIDEO15 = register(HunyuanVideo15Family())
