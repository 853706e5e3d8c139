"""Plain-text views of the connector's state: tables an operator reads at a glance.

Pure functions from protocol data to text. Colour is a parameter, decided once by the CLI
(on only for a terminal), so nothing here looks at the environment and every view can be
tested for its exact content.

Guests choose many of the strings shown (container-ids, link names, addresses, error
descriptions), and whoever runs a VM chooses its name and ports. The renderers trust their
input to be safe for a terminal: the CLI passes everything through ``printable_data()``
first, once, so no field can be forgotten (``connector.printable``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from connector.control.protocol import ChannelRow, GuestView, Link, LinkView
from connector.printable import printable

# Widest "last error" cell in the default table: long enough for a condition and the start
# of its description, short enough that a row fits a 160-column terminal.
LAST_ERROR_WIDTH = 40

# Seconds per unit for human durations, largest first.
_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))

_STATE_COLOUR = {"connected": "32", "waiting": "33", "error": "1;31", "gone": "2"}
_BOLD = "1"

_Data = TypeVar("_Data")


def printable_data(data: _Data) -> _Data:
    """A copy of protocol data (dicts, lists, strings, numbers) with every string, keys
    included, made ``printable()``: what the text views render."""
    if isinstance(data, str):
        return printable(data)  # type: ignore[return-value]
    if isinstance(data, Mapping):
        return {printable_data(k): printable_data(v) for k, v in data.items()}  # type: ignore[return-value]
    if isinstance(data, list | tuple):
        return type(data)(printable_data(v) for v in data)  # type: ignore[return-value]
    return data


def human_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m, 4d03h: the two largest units, like `ps` and `docker ps`."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    for i, (unit, size) in enumerate(_DURATION_UNITS[:-1]):
        if seconds >= size:
            small_unit, small_size = _DURATION_UNITS[i + 1]
            rest = (seconds % size) // small_size
            return f"{seconds // size}{unit}{rest:02d}{small_unit}"
    raise AssertionError("unreachable: seconds >= 60 matches minutes")


def human_bytes(count: int) -> str:
    """1023B, 1.5K, 292.6K, 3.0G: powers of 1024, as `ls -h` prints them."""
    value = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable: T is the last unit")


def human_rate(rate: float | None) -> str:
    """A msgs/s figure, or '-' before two refreshes have been seen."""
    if rate is None:
        return "-"
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"


def shorten(text: str | None, width: int | None) -> str:
    """One line of at most ``width`` characters (None: any), ending in an ellipsis when cut."""
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if width is None or len(line) <= width else line[: width - 1] + "…"


def clock(ts: float) -> str:
    """A local timestamp an operator can match against the journal."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@dataclass(frozen=True)
class Column:
    """A table column: its header and whether its cells are numbers (right-aligned)."""

    header: str
    numeric: bool = False


def table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    colour: bool,
    cell_colours: Mapping[tuple[int, int], str] | None = None,
) -> str:
    """Aligned columns separated by two spaces; colour codes never disturb alignment."""
    widths = [len(c.header) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    cell_colours = cell_colours or {}

    def line(cells: Sequence[str], r: int | None) -> str:
        out = []
        for c, (col, cell, width) in enumerate(zip(columns, cells, widths, strict=True)):
            last = c == len(columns) - 1
            padded = cell.rjust(width) if col.numeric else cell if last else cell.ljust(width)
            code = _BOLD if r is None else cell_colours.get((r, c))
            out.append(paint(padded, code, colour))
        return "  ".join(out).rstrip()

    return "\n".join(
        [line([c.header for c in columns], None)] + [line(row, r) for r, row in enumerate(rows)]
    )


def paint(text: str, code: str | None, colour: bool) -> str:
    """Wrap text in an SGR colour code when colour is on."""
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


@dataclass(frozen=True)
class Rates:
    """msgs/s per key between two refreshes of --watch; empty on the first refresh."""

    per_key: Mapping[Any, tuple[float, float]]

    def get(self, key: Any) -> tuple[str, str]:
        """The in and out rates for a key as cells."""
        pair = self.per_key.get(key)
        if pair is None:
            return "-", "-"
        return human_rate(pair[0]), human_rate(pair[1])


NO_RATES = Rates({})


def channel_rates(
    before: Sequence[ChannelRow], after: Sequence[ChannelRow], interval: float
) -> Rates:
    """msgs/s in and out per channel path between two lists of rows."""
    if interval <= 0:
        return NO_RATES
    old = {r["path"]: r for r in before}
    rates = {}
    for row in after:
        prev = old.get(row["path"])
        if prev is not None:
            rates[row["path"]] = (
                max(0, row["deliveries_in"] - prev["deliveries_in"]) / interval,
                max(0, row["deliveries_out"] - prev["deliveries_out"]) / interval,
            )
    return Rates(rates)


def link_key(link: LinkView | Mapping[str, Any]) -> tuple[str, int, str]:
    """What identifies a link across refreshes: its channel, session and name."""
    return (link["path"], link["session"], link["name"])


def link_rates(before: Sequence[LinkView], after: Sequence[LinkView], interval: float) -> Rates:
    """Deliveries/s per link; an "in" link's rate is in the first slot, "out" in the second."""
    if interval <= 0:
        return NO_RATES
    old = {link_key(lk): lk for lk in before}
    rates = {}
    for link in after:
        prev = old.get(link_key(link))
        if prev is not None:
            rate = max(0, link["deliveries"] - prev["deliveries"]) / interval
            rates[link_key(link)] = (rate, 0.0) if link["direction"] == "in" else (0.0, rate)
    return Rates(rates)


def render_channels(
    rows: Sequence[ChannelRow],
    now: float,
    colour: bool,
    wide: bool = False,
    rates: Rates | None = None,
    broker_marks: Mapping[str, str] | None = None,
) -> str:
    """The `channels` table: one row per channel, in the order given (sorted by guest)."""
    columns = [
        Column("GUEST"),
        Column("PORT"),
        Column("KIND"),
        Column("STATE"),
        Column("SINCE", numeric=True),
    ]
    if wide:
        columns += [Column("PATH"), Column("UPSTREAM"), Column("SESSIONS", numeric=True)]
    columns += [
        Column("LINKS", numeric=True),
        Column("MSGS IN", numeric=True),
        Column("MSGS OUT", numeric=True),
        Column("BYTES IN", numeric=True),
        Column("BYTES OUT", numeric=True),
    ]
    if wide:
        columns.append(Column("DISCARDED", numeric=True))
    if rates is not None:
        columns += [Column("IN/S", numeric=True), Column("OUT/S", numeric=True)]
    if broker_marks is not None:
        columns.append(Column("BROKER"))
    columns.append(Column("LAST ERROR"))

    cells, colours = [], {}
    state_col = 3
    for r, row in enumerate(rows):
        line = [
            row["guest"],
            row["port"],
            row["kind"],
            row["state"],
            human_duration(now - row["since"]),
        ]
        if wide:
            line += [row["path"], row["upstream"] or "-", str(row["sessions"])]
        line += [
            str(row["links"]),
            str(row["deliveries_in"]),
            str(row["deliveries_out"]),
            human_bytes(row["bytes_in"]),
            human_bytes(row["bytes_out"]),
        ]
        if wide:
            line.append(human_bytes(row["discarded_bytes"]))
        if rates is not None:
            line += rates.get(row["path"])
        if broker_marks is not None:
            mark = broker_marks.get(row["path"], "-")
            if mark not in ("-", "listed"):
                colours[(r, len(line))] = _STATE_COLOUR["error"]
            line.append(mark)
        line.append(shorten(row["last_error"], None if wide else LAST_ERROR_WIDTH))
        colours[(r, state_col)] = _STATE_COLOUR.get(row["state"], "")
        cells.append(line)
    if not cells:
        return "no channels"
    return table(columns, cells, colour, colours)


def render_links(links: Sequence[LinkView | Link], colour: bool, rates: Rates | None = None) -> str:
    """The links table. With LinkViews (the `links` command) it names each link's guest and
    port; with a channel's own links (inside `guest NAME`) it leaves them out."""
    if not links:
        return "no routed links"
    with_channel = "guest" in links[0]
    columns = [Column("GUEST"), Column("PORT")] if with_channel else []
    columns += [
        Column("SESSION", numeric=True),
        Column("DIR"),
        Column("ADDRESS"),
        Column("LINK"),
        Column("CREDIT", numeric=True),
        Column("UNSETTLED", numeric=True),
        Column("DELIVERIES", numeric=True),
        Column("BYTES", numeric=True),
    ]
    if rates is not None:
        columns.append(Column("MSGS/S", numeric=True))
    cells = []
    for link in links:
        line = [link["guest"], link["port"]] if with_channel else []  # type: ignore[typeddict-item]
        line += [
            str(link["session"]),
            _direction(link["direction"]),
            link["address"] or "(anonymous)",
            link["name"],
            str(link["credit"]),
            str(link["unsettled"]),
            str(link["deliveries"]),
            human_bytes(link["bytes"]),
        ]
        if rates is not None:
            rate_in, rate_out = rates.get(link_key(link))
            line.append(rate_in if link["direction"] == "in" else rate_out)
        cells.append(line)
    return table(columns, cells, colour)


def _direction(direction: str) -> str:
    """Arrow and word, so the direction reads without knowing the in/out convention."""
    return "in →broker" if direction == "in" else "out →guest"


def render_guest(view: GuestView, now: float, colour: bool, rates: Rates | None = None) -> str:
    """Everything about one guest: identity, then each channel with its links and errors."""
    out = [
        paint(f"guest {view['name']}", _BOLD, colour),
        _field("uuid", view["uuid"] or "-"),
        _field("qemu pid", str(view["pid"]) if view["pid"] is not None else "-"),
        _field("found by", view["found_by"]),
    ]
    for entry in view["channels"]:
        detail = entry["detail"]
        upstream = detail["upstream"]
        state = paint(entry["state"], _STATE_COLOUR.get(entry["state"]), colour)
        out += [
            "",
            paint(f"channel {entry['path']}", _BOLD, colour)
            + f" ({entry['kind']}, port {entry['port']})",
            _field("state", f"{state} for {human_duration(now - entry['since'])}"),
            _field("upstream", _upstream_line(upstream)),
            _field(
                "traffic",
                f"in {entry['deliveries_in']} msgs / {human_bytes(entry['bytes_in'])}, "
                f"out {entry['deliveries_out']} msgs / {human_bytes(entry['bytes_out'])}, "
                f"discarded {human_bytes(entry['discarded_bytes'])}",
            ),
            _field(
                "connections",
                f"{detail['guest_connections']} from the guest, "
                f"{detail['upstream_reconnects']} upstream reconnects",
            ),
            _field("sessions", _sessions_line(detail["sessions"])),
        ]
        if rates is not None:
            rate_in, rate_out = rates.get(entry["path"])
            out.append(_field("rate", f"in {rate_in} msgs/s, out {rate_out} msgs/s"))
        if detail["errors_by_condition"]:
            counts = ", ".join(
                f"{cond} {n}" for cond, n in sorted(detail["errors_by_condition"].items())
            )
            out.append(_field("errors", f"{counts} (over the channel's life)"))
        if detail["links"]:
            links = sorted(detail["links"], key=lambda lk: (lk["session"], lk["name"]))
            out += ["", _indent(render_links(links, colour))]
        if detail["errors"]:
            out += ["", "  recent errors:", _indent(_errors_table(detail["errors"], now, colour))]
    return "\n".join(out)


def render_broker_check(check: Mapping[str, Any]) -> str:
    """The broker check's findings as lines of text."""
    if check.get("error"):
        return f"broker check failed: {check['error']}"
    lines = [
        f"broker check against {check['broker']} ({check['adapter']}): "
        f"{len(check['matched'])} listed, {len(check['missing_on_broker'])} missing, "
        f"{len(check['unknown_to_connector'])} unknown"
    ]
    lines += [
        f"  MISSING on broker: guest {m['guest']} port {m['port']} ({m['path']}), "
        f"container-id {m['container_id'] or '-'}"
        for m in check["missing_on_broker"]
    ]
    lines += [
        f"  UNKNOWN to connector: broker connection from {u['remote_address'] or '?'} claims "
        f"guest {u['guest']} port {u['port'] or '-'} channel {u['channel'] or '-'}, "
        f"container-id {u['container_id'] or '-'}"
        for u in check["unknown_to_connector"]
    ]
    if not check["shows_properties"]:
        lines.append(
            "  (this broker does not show open-frame properties: matched by "
            "address and container-id, and connections claiming a guest cannot be seen)"
        )
    return "\n".join(lines)


def _errors_table(errors: Sequence[Mapping[str, Any]], now: float, colour: bool) -> str:
    columns = [
        Column("TIME"),
        Column("AGO", numeric=True),
        Column("CONDITION"),
        Column("DESCRIPTION"),
    ]
    cells = [
        [clock(e["time"]), human_duration(now - e["time"]), e["condition"], e["description"] or "-"]
        for e in reversed(errors)  # newest first, as an operator reads a log tail
    ]
    return table(columns, cells, colour)


def _upstream_line(upstream: Mapping[str, Any]) -> str:
    parts = [f"{upstream['url'] or '-'} ({upstream['state']})"]
    if upstream.get("container_id"):
        parts.append(f"container-id {upstream['container_id']}")
    if upstream.get("local_address"):
        parts.append(f"local {upstream['local_address']}")
    return ", ".join(parts)


def _sessions_line(sessions: Sequence[Mapping[str, Any]]) -> str:
    if not sessions:
        return "none open"
    return ", ".join(f"#{s['channel']} ({s['links']} links)" for s in sessions)


def _field(name: str, value: str) -> str:
    return f"  {name:<12}{value}"


def _indent(text: str) -> str:
    # split("\n"), not splitlines(): the latter also breaks at characters a table cell may hold.
    return "\n".join("  " + line if line else line for line in text.split("\n"))
