"""The sans-IO routing core: a guest-side proton connection paired with an upstream one.

``engine`` is one proton side; ``router`` pairs two of them and owns the endpoint lifecycle
(open, begin, attach, detach, end, close); ``route`` is one pair of links; ``terminus`` copies
attach fields across; ``credit`` mirrors flow; ``deliveries`` is the per-message path. None of
these modules touches a file descriptor.
"""
