"""What the plugin changes in fairseq itself, written against fairseq 0.12
(``fairseq-fixed`` 0.12.3.1).

* :func:`keep_adaptive_softmax_checkpoints_loadable`: fairseq's
  ``TransformerDecoderBase.upgrade_state_dict_named`` writes
  ``decoder.output_projection.weight`` from the input embedding whenever
  ``--share-decoder-input-output-embed`` (or ``--share-all-embeddings``,
  which implies it) is set, also when an adaptive softmax
  (``--adaptive-softmax-cutoff``) replaces the output projection: every
  such checkpoint then fails to load (``Unexpected key(s) in state_dict:
  "decoder.output_projection.weight"``) in ``fairseq-generate``, resume and
  the hub, though fairseq trains it.  The patched method removes that key
  again when the decoder has no output projection.  Nothing else changes;
  visible as ``fairseq_mhce_patched`` on the method.
"""

import functools

from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase


def keep_adaptive_softmax_checkpoints_loadable() -> bool:
    """Patch ``TransformerDecoderBase.upgrade_state_dict_named`` (once, also
    when the plugin is imported under a second name); True if it patched."""
    original = TransformerDecoderBase.upgrade_state_dict_named
    if getattr(original, "fairseq_mhce_patched", False):
        return False

    @functools.wraps(original)
    def upgrade_state_dict_named(self, state_dict, name):
        out = original(self, state_dict, name)
        # an adaptive softmax stands where the output projection would be: the
        # key fairseq just synthesized from the shared embedding has no module
        if getattr(self, "adaptive_softmax", None) is not None and getattr(self, "output_projection", None) is None:
            state_dict.pop(f"{name}.output_projection.weight", None)
        return out

    upgrade_state_dict_named.fairseq_mhce_patched = True
    TransformerDecoderBase.upgrade_state_dict_named = upgrade_state_dict_named
    return True
