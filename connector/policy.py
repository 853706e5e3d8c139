"""Which addresses a guest may attach to: per-guest rules with ``{guest}`` substitution.

A guest is untrusted. By default it may use any address except the brokers' management
nodes (``qmf.default.direct``, ``activemq.management``, ``$management``), which a rule must
name literally to allow. Rules match guests by name pattern; the first match wins, then
the default rule.

Address patterns use AMQP's wildcard style: ``#`` matches any run of characters, ``*``
any run without ``.`` or ``/``; ``{guest}`` is replaced by the guest's name first.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .routing.route import AttachRequest, LinkPolicy

UNAUTHORIZED = "amqp:unauthorized-access"
MANAGEMENT_ADDRESSES = frozenset({"qmf.default.direct", "activemq.management", "$management"})
_RULE_KEYS = {"guests", "addresses", "dynamic", "relay", "transactions", "prefix"}


@dataclass(frozen=True)
class Rule:
    """What the guests matching ``guests`` may do."""

    guests: str = "*"
    addresses: tuple[str, ...] = ("#",)
    dynamic: bool = True  # may create dynamic (temporary) nodes
    relay: bool = True  # may send through the anonymous relay (null target)
    transactions: bool = True  # may attach a transaction coordinator
    # Put in front of every address the guest names, so guests that use the same names
    # land in separate namespaces on the broker ({guest} is substituted). Terminus
    # addresses and relayed messages' 'to' are mapped; addresses inside message bodies or
    # reply-to are not.
    prefix: str = ""

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> Rule:
        """A rule from TOML; unknown keys and wrong types name themselves."""
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table of rule settings")
        for key, value in table.items():
            if key not in _RULE_KEYS:
                raise ConfigError(f"{where}.{key}", "unknown key")
            if key in {"dynamic", "relay", "transactions"} and not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}", "must be true or false")
        addresses = table.get("addresses", ["#"])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ConfigError(f"{where}.addresses", "must be a list of address patterns")
        return cls(
            guests=_string(table.get("guests", "*"), f"{where}.guests"),
            addresses=tuple(addresses),
            dynamic=table.get("dynamic", True),
            relay=table.get("relay", True),
            transactions=table.get("transactions", True),
            prefix=_string(table.get("prefix", ""), f"{where}.prefix"),
        )

    def restricts_addresses(self) -> bool:
        """Whether some address is refused (beyond management): relay must be checked."""
        return "#" not in self.addresses

    def allows_address(self, guest: str, address: str) -> bool:
        """Whether ``address`` matches one of this rule's patterns for ``guest``."""
        patterns = [p.replace("{guest}", guest) for p in self.addresses]
        if address in MANAGEMENT_ADDRESSES:
            return address in patterns  # management only when named literally
        return any(_compile(p).fullmatch(address) for p in patterns)


@dataclass(frozen=True)
class Policy:
    """All rules; ``[policy]`` with ``[policy.default]`` and ``[[policy.rule]]``."""

    rules: tuple[Rule, ...] = ()
    default: Rule = field(default_factory=Rule)

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> Policy:
        """The ``[policy]`` table."""
        for key in table:
            if key not in {"default", "rule"}:
                raise ConfigError(f"policy.{key}", "unknown key")
        default = Rule.from_table(table.get("default", {}), "policy.default")
        listed = table.get("rule", [])
        if not isinstance(listed, list):
            raise ConfigError("policy.rule", "must be a list of rules ([[policy.rule]] tables)")
        rules = tuple(Rule.from_table(t, f"policy.rule[{i}]") for i, t in enumerate(listed))
        return cls(rules, default)

    def rule_for(self, guest: str) -> Rule:
        """The first rule whose guest pattern matches, else the default."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(guest, rule.guests):
                return rule
        return self.default

    def check(self, guest: str, req: AttachRequest) -> tuple[str, str] | None:
        """None to allow the attach, or (condition, description) to refuse it."""
        rule = self.rule_for(guest)
        if req.coordinator:
            if rule.transactions:
                return None
            return UNAUTHORIZED, f"guest {guest} may not use transactions"
        if req.dynamic:
            if rule.dynamic:
                return None
            return UNAUTHORIZED, f"guest {guest} may not create dynamic nodes"
        if req.address is None:
            if req.sending and rule.relay:
                return None
            what = "the anonymous relay" if req.sending else "a link without an address"
            return UNAUTHORIZED, f"guest {guest} may not use {what}"
        if rule.allows_address(guest, req.address):
            return None
        return UNAUTHORIZED, f"guest {guest} may not attach to {req.address!r}"

    def for_guest(self, guest: str) -> GuestPolicy:
        """The policy the routing core applies to one guest's links."""
        return GuestPolicy(self, guest)


class GuestPolicy(LinkPolicy):
    """One guest's view of the policy, as the routing core asks it."""

    def __init__(self, policy: Policy, guest: str) -> None:
        self.policy = policy
        self.guest = guest
        rule = policy.rule_for(guest)
        self.prefix = rule.prefix.replace("{guest}", guest)
        # Relayed messages are decoded only when their 'to' could be refused or mapped.
        self.checks_relay = rule.relay and (rule.restricts_addresses() or bool(self.prefix))

    def check_attach(self, req: AttachRequest) -> tuple[str, str] | None:
        return self.policy.check(self.guest, req)

    def check_relay(self, address: str | None) -> tuple[str, str] | None:
        if address is None:
            return UNAUTHORIZED, f"guest {self.guest}: a relayed message needs a 'to' address"
        return self.policy.check(self.guest, AttachRequest(address, True, False, False))

    def to_broker(self, address: str) -> str:
        return self.prefix + address

    def to_guest(self, address: str) -> str:
        return address.removeprefix(self.prefix) if self.prefix else address


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, "must be a string")
    return value


_cache: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    compiled = _cache.get(pattern)
    if compiled is None:
        parts = []
        for ch in pattern:
            if ch == "#":
                parts.append(".*")
            elif ch == "*":
                parts.append("[^./]*")
            else:
                parts.append(re.escape(ch))
        compiled = _cache[pattern] = re.compile("".join(parts))
    return compiled
