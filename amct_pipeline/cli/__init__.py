"""The ``amct-pipeline`` command line: a thin layer over Session."""
