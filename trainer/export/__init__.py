"""After a run: merge and export (safetensors, GGUF), their checks, and evaluation."""
