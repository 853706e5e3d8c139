"""Copy a link's attach fields from one side to the other, unchanged.

Everything proton's engine decodes from an attach is carried: source and target with all
their terminus fields (address, durable, expiry-policy, timeout, dynamic and
dynamic-node-properties, distribution-mode, filter, outcomes, capabilities, and the
coordinator type with its capabilities), both settle modes, link properties and
max-message-size. Proton 0.40's engine neither decodes nor writes the attach's link-level
offered and desired capabilities, nor the source's default-outcome, and it drops a source
that has neither an address nor dynamic set; the engines read those from the peer's attach
frame and write them into ours (``frames``).
"""

from __future__ import annotations

from typing import Any

from cproton_ffi import ffi, lib

from .engine import Engine, copy_data


def copy_attach(dst: Any, src: Any, dst_engine: Engine, src_engine: Engine) -> None:
    """Make ``dst``'s local attach say what ``src``'s peer said in its attach."""
    name = ffi.string(lib.pn_link_name(src)).decode(errors="replace")
    # Keyed by the role each attach frame states: the peer's is the opposite of ``src``'s.
    extras = src_engine.peer_attach_extras((name, bool(lib.pn_link_is_sender(src))))
    if extras is not None:
        dst_engine.complete_attach((name, bool(lib.pn_link_is_receiver(dst))), extras)
    lib.pn_terminus_copy(lib.pn_link_source(dst), lib.pn_link_remote_source(src))
    lib.pn_terminus_copy(lib.pn_link_target(dst), lib.pn_link_remote_target(src))
    lib.pn_link_set_snd_settle_mode(dst, lib.pn_link_remote_snd_settle_mode(src))
    lib.pn_link_set_rcv_settle_mode(dst, lib.pn_link_remote_rcv_settle_mode(src))
    copy_data(lib.pn_link_properties(dst), lib.pn_link_remote_properties(src))
    lib.pn_link_set_max_message_size(dst, lib.pn_link_remote_max_message_size(src))
