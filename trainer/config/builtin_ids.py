"""The ids of the built-in models, which a run config may name; how each is fetched and built is trainer/model/."""

TINY_MODEL_ID = "builtin:tiny"  # a random-weight toy for fast tests (trainer/model/tiny_model.py)
SMOLLM2_ID = "builtin:smollm2-135m"  # SmolLM2-135M-Instruct from a PyPI wheel (trainer/model/builtin_models.py)
BUILTIN_IDS = (TINY_MODEL_ID, SMOLLM2_ID)
