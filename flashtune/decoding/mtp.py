"""Old import path of the MTP drafter, kept for code outside decoding/ (flashtune/__init__.py,
bench/profile_decode.py); the code lives in drafters/mtp/ and drafters/base.py."""

from flashtune.decoding.drafters.base import (IGNORE_INDEX, base_dims, causal_mask, check_base,  # noqa: F401
                                              decoder_layers, final_norm, new_block, rotary, run_block, trunk)
from flashtune.decoding.drafters.base import compact_block as _compact_block  # noqa: F401
from flashtune.decoding.drafters.base import engine_norm as _engine_norm  # noqa: F401
from flashtune.decoding.drafters.mtp import MTPConfig, MTPDrafter, MTPLoss, MTPModules, WithMTP  # noqa: F401
