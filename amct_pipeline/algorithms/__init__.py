"""Algorithm interfaces (what plugins usually implement) and the built-in algorithms."""
