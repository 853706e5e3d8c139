"""Copy a link's attach fields from one side to the other, unchanged.

Everything proton's engine decodes from an attach is carried: source and target with all
their terminus fields (address, durable, expiry-policy, timeout, dynamic and
dynamic-node-properties, distribution-mode, filter, outcomes, capabilities, and the
coordinator type with its capabilities), both settle modes, link properties and
max-message-size. Proton 0.40's engine does not decode the attach's link-level offered and
desired capabilities, nor the source's default-outcome, so those cannot be carried; see
docs/routing.md.
"""

from __future__ import annotations

from typing import Any

from cproton_ffi import lib

from .engine import copy_data


def copy_attach(dst: Any, src: Any) -> None:
    """Make ``dst``'s local attach say what ``src``'s peer said in its attach."""
    lib.pn_terminus_copy(lib.pn_link_source(dst), lib.pn_link_remote_source(src))
    lib.pn_terminus_copy(lib.pn_link_target(dst), lib.pn_link_remote_target(src))
    lib.pn_link_set_snd_settle_mode(dst, lib.pn_link_remote_snd_settle_mode(src))
    lib.pn_link_set_rcv_settle_mode(dst, lib.pn_link_remote_rcv_settle_mode(src))
    copy_data(lib.pn_link_properties(dst), lib.pn_link_remote_properties(src))
    lib.pn_link_set_max_message_size(dst, lib.pn_link_remote_max_message_size(src))
