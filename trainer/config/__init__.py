"""The run config (RunConfig, its YAML and presets), where files are, and the page's form over it."""
