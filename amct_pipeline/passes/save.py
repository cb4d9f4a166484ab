"""save: write the current model into the output directory."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..options import Options
from .base import Pass, PassResult


class SaveOptions(Options):
    filename: str = Field("{model}.onnx", description="File name in the output directory; {model} is the input's stem.")
    external_data: Optional[bool] = Field(None, description="Weights in '<file>.data'; default: only over 2 GB.")


class SavePass(Pass):
    name = "save"
    summary = "Write the current model into the output directory (atomically, external data over 2 GB)."
    Options = SaveOptions
    writes = ("filename",)

    def output_files(self, render, session) -> list[tuple[str, str]]:
        name = render(self.options.filename, "filename")
        return [("filename", name), ("filename", name + ".data")]      # .data: external data beside it

    def run(self, graph, ctx) -> PassResult:
        from ..ir.io import write_model
        if ctx.outputs.directory is None:
            return PassResult(False, {"written": 0})
        filename = ctx.file_name(self.options.filename, "filename")
        files = write_model(graph, ctx.output_path(filename), external=self.options.external_data)
        for extra in files[1:]:
            ctx.outputs.path(extra.name)      # the data file is committed with the model
        return PassResult(False, {"written": len(files), "file": filename})
