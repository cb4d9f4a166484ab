"""Example amct-pipeline plugin."""
