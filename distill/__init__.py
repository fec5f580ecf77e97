"""distill: turn a pretrained Hugging Face causal LM into a recurrent (linear-attention) model."""
from .config import ConvertConfig
from .convert import convert_model, load_converted, register_all
from .feature_maps import FeatureMap, register_feature_map

register_all()

__all__ = ["ConvertConfig", "FeatureMap", "convert_model", "load_converted", "register_feature_map"]
__version__ = "0.1.0"
