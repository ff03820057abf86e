"""The DynTRM model: ``from dyntrm.model import ArcTransformer``."""

from .dyntrm import ArcTransformer, DecodeState, DynTRMBlock, ModelOutput
from .experts import ExpertLibrary, ExpertMLP

__all__ = ["ArcTransformer", "DecodeState", "DynTRMBlock", "ModelOutput", "ExpertLibrary", "ExpertMLP"]
