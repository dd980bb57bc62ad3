"""Pipeline configuration: a typed schema, YAML loading and ``--set`` overrides.

Every value is validated at load time: an unknown key, a wrong type or a value
outside its allowed set raises :class:`ConfigError` naming the key and the file.
``schema`` holds the sections (each key's meaning in its dataclass's ``Attributes:``,
from which the docs' config reference is generated); ``loading`` reads and checks them.
"""

from pipeline.config.loading import DEMO_CONFIG, _sections, _type_name, build_config, load_config, parse_overrides
from pipeline.config.schema import (
    READER_EDIT_ATTRIBUTES,
    DataConfig,
    EvaluateConfig,
    MlflowConfig,
    ModelConfig,
    PacsConfig,
    PipelineConfig,
    PreprocessConfig,
    QcConfig,
    RegistryConfig,
    TrainConfig,
)
from pipeline.errors import ConfigError

__all__ = [
    "DEMO_CONFIG",
    "READER_EDIT_ATTRIBUTES",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "MlflowConfig",
    "ModelConfig",
    "PacsConfig",
    "PipelineConfig",
    "PreprocessConfig",
    "QcConfig",
    "RegistryConfig",
    "TrainConfig",
    "_sections",
    "_type_name",
    "build_config",
    "load_config",
    "parse_overrides",
]
