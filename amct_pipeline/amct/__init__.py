"""AMCT's file formats, read and written exactly: the record file (``record``), the JSON quant config
(``quant_config``), the simplified ``.cfg`` (``cfg``) and the retrain configs (``retrain_config``).

Protobuf message classes are built lazily from the ``.proto`` files in ``proto/`` (package data).
"""
from .cfg import parse_cfg, read_cfg
from .errors import ConfigFileError, Issue, RecordError
from .quant_config import (
    LayerQuantConfig, QuantConfig, TensorQuantConfig, create_quant_config, parse_quant_config, read_quant_config,
    write_quant_config,
)
from .record import (
    LayerRecord, QuantRecord, format_record, parse_record, read_record, validate_against, validate_record,
    write_record,
)
from .retrain_config import (
    LayerRetrainConfig, RetrainConfig, create_retrain_config, parse_retrain_cfg, parse_retrain_config,
    read_retrain_cfg, read_retrain_config, write_retrain_config,
)

__all__ = [
    "ConfigFileError", "Issue", "RecordError",
    "LayerRecord", "QuantRecord", "format_record", "parse_record", "read_record", "validate_against",
    "validate_record", "write_record",
    "LayerQuantConfig", "QuantConfig", "TensorQuantConfig", "create_quant_config", "parse_quant_config",
    "read_quant_config", "write_quant_config",
    "parse_cfg", "read_cfg",
    "LayerRetrainConfig", "RetrainConfig", "create_retrain_config", "parse_retrain_cfg", "parse_retrain_config",
    "read_retrain_cfg", "read_retrain_config", "write_retrain_config",
]
