"""Per-backend implementations, installed as `keras_strategies.backends`.

Only the module of the active Keras backend is ever imported.
"""
