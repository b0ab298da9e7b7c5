"""Backbones: frozen models that prompts go into, one file per kind (``base.Backbone`` is the protocol)."""

from .base import Backbone, ModuleBackbone, fingerprint_id, fingerprints_match, freeze
from .causal_lm import CausalLMBackbone
from .clip import CLIPBackbone
from .encoder import EncoderBackbone
from .loading import load_backbone, resolve_device, resolve_dtype
from .seq2seq import Seq2SeqBackbone
from .vision import ImageBackbone, ViTBackbone

__all__ = ["Backbone", "CLIPBackbone", "CausalLMBackbone", "EncoderBackbone", "ImageBackbone", "ModuleBackbone", "Seq2SeqBackbone", "ViTBackbone", "fingerprint_id", "fingerprints_match", "freeze",
           "load_backbone", "resolve_device", "resolve_dtype"]
