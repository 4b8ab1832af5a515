from . import transformer_mhce  # noqa: F401
