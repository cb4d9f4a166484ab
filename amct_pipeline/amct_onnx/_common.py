"""What the amct_onnx functions and the calibration taps share: one way to run a pipeline."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

__all__ = ["CALIBRATION_METADATA_KEY", "api_error", "hermetic_session", "run_passes"]

# metadata of a modified (calibration) model: what it calibrates, for save_model
CALIBRATION_METADATA_KEY = "amct_pipeline.amct_onnx.calibration"



def api_error(where: str, message: str):
    """A one-line ConfigError 'where: message' (where: the AMCT function or command)."""
    from ..errors import ConfigError, Problem
    return ConfigError([Problem(where, "", message)])


def hermetic_session():
    """A hermetic session: AMCT's files name only built-in algorithms."""
    from ..session import Session
    return Session(load_entrypoints=False)


@contextmanager
def _unwrapped() -> Iterator[None]:
    """A pass's own one-line error instead of the pipeline's 'passes[i] ... failed' frame."""
    from ..errors import AmctError, PassError
    try:
        yield
    except PassError as exc:
        cause = exc.__cause__
        if isinstance(cause, AmctError):
            raise cause from None
        raise


def run_passes(passes: Sequence[tuple[str, dict[str, Any]]], model: Any, *, datasets=None, output_dir=None):
    session = hermetic_session()
    with _unwrapped():
        pipeline = session.pipeline([session.make_pass(name, **options) for name, options in passes])
        return pipeline.run(model, datasets=datasets, output_dir=output_dir)


