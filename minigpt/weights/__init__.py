"""Checkpoints: find them (local directory, shipped model or the hub), check them, load them memory-mapped,
save them; and GPT-2's random initialisation. Only config.json and safetensors are read: nothing is unpickled.

The modules, one job each:
  names       the HF <-> minigpt name mapping and the plan it gives (``plan``, ``from/to_hf_state_dict``)
  reading     a checkpoint directory's files, checked before they are opened, and their headers
  hub         the HuggingFace hub (the local cache first)
  loading     ``GPT.from_pretrained`` (``load_model``; ``locate``, the shipped models)
  initialise  ``GPT.random`` and the meta-device build (``random_model``, ``build_on_meta``, ``parameter_shapes``)
  saving      ``save_pretrained``
This package re-exports their public names, so ``from minigpt.weights import ...`` reaches any of them.
"""
from .hub import hub_directory
from .initialise import build_on_meta, parameter_shapes, random_model
from .loading import SHIPPED, SHIPPED_MARK, load_model, locate, shipped_description
from .names import Header, ShapesOf, finite, from_hf_state_dict, name_map, plan, to_hf_state_dict
from .reading import (CONFIG_FILE, INDEX_FILE, SAFETENSORS_DTYPES, WEIGHTS_FILE, checked_file, read_config,
                      read_header, read_safetensors, weight_files)
from .saving import save_pretrained

__all__ = ["CONFIG_FILE", "INDEX_FILE", "SAFETENSORS_DTYPES", "SHIPPED", "SHIPPED_MARK", "WEIGHTS_FILE", "Header",
           "ShapesOf", "build_on_meta", "checked_file", "finite", "from_hf_state_dict", "hub_directory",
           "load_model", "locate", "name_map", "parameter_shapes", "plan", "random_model", "read_config", "read_header",
           "read_safetensors", "save_pretrained", "shipped_description", "to_hf_state_dict", "weight_files"]
