"""JSON Schema of pipeline files, with each registered pass's options, for editors."""
from __future__ import annotations

from typing import Any

from .spec import PipelineSpec

__all__ = ["pipeline_json_schema"]


def pipeline_json_schema(session) -> dict[str, Any]:
    schema = PipelineSpec.model_json_schema(by_alias=True)
    for hidden in ("source", "base_dir"):
        schema.get("properties", {}).pop(hidden, None)
    variants = []
    for entry in session.registry("passes"):
        options = entry.obj.Options.model_json_schema()
        defs = options.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        variants.append({
            "type": "object", "description": entry.obj.summary, "additionalProperties": False,
            "required": ["pass"],
            "properties": {"pass": {"const": entry.name}, "options": options},
        })
    schema["properties"]["passes"] = {"type": "array", "items": {"oneOf": variants}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "amct-pipeline pipeline file"
    return schema
