from distillation.config.loader import load_config, to_yaml
from distillation.config.schema import Config

__all__ = ["Config", "load_config", "to_yaml"]
