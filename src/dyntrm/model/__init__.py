"""The DynTRM model: ``from dyntrm.model import ArcTransformer``."""

from .context import ModelOutput
from .dyntrm import ArcTransformer, DynTRMBlock
from .experts import ExpertLibrary, ExpertMLP
from .generate import DecodeState

__all__ = ["ArcTransformer", "DecodeState", "DynTRMBlock", "ModelOutput", "ExpertLibrary", "ExpertMLP"]
