"""The pure rendering helpers: human units, shortening, alignment with colour, rates."""

from __future__ import annotations

import re

from connector.control.protocol import channel_rows, link_views
from connector.control.sample import sample_snapshot
from connector.status import views

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_human_duration() -> None:
    cases = {
        0: "0s", 59.9: "59s", 60: "1m00s", 754: "12m34s", 3599: "59m59s", 3600: "1h00m",
        7325: "2h02m", 86400: "1d00h", 90000: "1d01h", 40 * 86400: "40d00h", -5: "0s",
    }  # fmt: skip
    assert {s: views.human_duration(s) for s in cases} == cases


def test_human_bytes() -> None:
    cases = {0: "0B", 1023: "1023B", 1024: "1.0K", 1536000: "1.5M", 3 * 1024**3: "3.0G"}
    assert {n: views.human_bytes(n) for n in cases} == cases
    assert views.human_bytes(5 * 1024**5) == "5120.0T"


def test_shorten() -> None:
    assert views.shorten(None, 10) == "-"
    assert views.shorten("a\n  b", 10) == "a b"
    assert views.shorten("0123456789abc", 10) == "012345678…"
    assert views.shorten("0123456789abc", None) == "0123456789abc"


def test_table_aligns_numbers_right_and_colour_does_not_shift_columns() -> None:
    columns = [views.Column("NAME"), views.Column("N", numeric=True), views.Column("NOTE")]
    rows = [["a", "5", "x"], ["long-name", "123", "-"]]
    plain = views.table(columns, rows, colour=False)
    assert plain.splitlines() == [
        "NAME         N  NOTE",
        "a            5  x",
        "long-name  123  -",
    ]
    coloured = views.table(columns, rows, colour=True, cell_colours={(0, 0): "32"})
    assert "\x1b[32ma        \x1b[0m" in coloured and "\x1b[1mNAME" in coloured
    assert ANSI.sub("", coloured) == plain


def test_channel_rates_between_refreshes() -> None:
    before = channel_rows(sample_snapshot(1000.0))
    after = channel_rows(sample_snapshot(1000.0))
    web1 = next(r for r in after if r["guest"] == "web1")
    web1["deliveries_in"] += 30
    web1["deliveries_out"] += 3
    rates = views.channel_rates(before, after, 2.0)
    assert rates.get(web1["path"]) == ("15", "1.5")
    assert rates.get("/no/such/path") == ("-", "-")
    assert views.channel_rates(before, after, 0.0) is views.NO_RATES


def test_link_rates_go_in_the_links_direction() -> None:
    before = link_views(sample_snapshot(1000.0))
    after = link_views(sample_snapshot(1000.0))
    for link in after:
        link["deliveries"] += 20
    rates = views.link_rates(before, after, 4.0)
    inbound = next(lk for lk in after if lk["direction"] == "in")
    outbound = next(lk for lk in after if lk["direction"] == "out")
    assert rates.get(views.link_key(inbound)) == ("5.0", "0.0")
    assert rates.get(views.link_key(outbound)) == ("0.0", "5.0")


def test_empty_views_say_so() -> None:
    assert views.render_channels([], 0.0, colour=False) == "no channels"
    assert views.render_links([], colour=False) == "no routed links"


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    evil = "a\x1b]0;t\x07\r\n\x00\x7f\x9b2J\u2028\u202eb\\x1b é ✓"
    shown = views.printable(evil)
    assert shown == "a\\x1b]0;t\\x07\\r\\n\\x00\\x7f\\x9b2J\\u2028\\u202eb\\x1b é ✓"
    assert views.printable(shown) == shown  # idempotent: what it writes is printable
    assert shown.isprintable()


def test_printable_data_reaches_every_string_keys_included() -> None:
    data = {"a\n": ["x\x1b", ("y\x07", 3)], "n": None, "f": 1.5}
    assert views.printable_data(data) == {"a\\n": ["x\\x1b", ("y\\x07", 3)], "n": None, "f": 1.5}
