"""What plugin authors import: ``from amct_pipeline.plugins import hookimpl``."""
import pluggy

PROJECT = "amct_pipeline"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "PROJECT"]
