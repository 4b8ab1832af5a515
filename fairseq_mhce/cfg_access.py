"""Read and change one key of a config, whatever holds it: the plugin's one
config reader.

fairseq hands out configs in four shapes: an ``argparse.Namespace``
(``fairseq-train``'s args; ``cfg["model"]`` of a legacy architecture and
``args`` of an older checkpoint), a plain ``dict`` (the ``cfg`` that fairseq
0.12 saves in a checkpoint), an omegaconf ``DictConfig`` (``fairseq-hydra-train``,
a checkpoint's config once fairseq has loaded it; in struct mode an unknown key
raises) and a dataclass (``TransformerConfig``).  Every command and module of
the plugin reads and writes them through the four functions here.
"""

from collections.abc import Mapping

from omegaconf import DictConfig, open_dict


def cfg_get(cfg, key: str, default=None):
    """``cfg[key]`` of a dict / DictConfig, ``cfg.key`` of a Namespace or a
    dataclass; ``default`` when ``cfg`` is None, lacks the key, or cannot give
    its value (a struct DictConfig without it, an unresolvable interpolation).
    A key whose value is None gives None."""
    if cfg is None:
        return default
    try:
        if isinstance(cfg, Mapping):
            return cfg.get(key, default)
        return getattr(cfg, key, default)
    except Exception:  # omegaconf: a struct config without the key, a value that does not resolve
        return default


def cfg_set(cfg, key: str, value) -> None:
    """``cfg[key] = value`` (a new key of a struct DictConfig included)."""
    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            cfg[key] = value
    elif isinstance(cfg, Mapping):
        cfg[key] = value
    else:
        setattr(cfg, key, value)


def cfg_keys(cfg) -> list:
    """The keys of ``cfg`` ([] for None)."""
    if cfg is None:
        return []
    return list(cfg.keys()) if isinstance(cfg, Mapping) else list(vars(cfg).keys())


def cfg_delete(cfg, key: str) -> None:
    """Remove ``key`` from ``cfg`` when it is there."""
    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            cfg.pop(key, None)
    elif isinstance(cfg, Mapping):
        cfg.pop(key, None)
    elif hasattr(cfg, key):
        delattr(cfg, key)
