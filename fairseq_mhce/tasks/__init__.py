from . import translation_mhce  # noqa: F401
