"""Before a run: the memory estimate and the pre-flight that measures a few real steps."""
