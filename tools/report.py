"""Printing shared by the commands: one table style for an on-device evaluation."""


def print_report(ev, title="on-device evaluation", extra=()):
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title, show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for k, v in [*ev.rows()[:4], *extra, *ev.rows()[4:]]:
        t.add_row(k, v)
    Console().print(t)
