"""What the command-line entry points share: one help layout."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and appends each flag's default, except None and False
    (a flag that is off or unset says in its help what that means)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace, at_least: dict[str, float],
                 above_zero: tuple[str, ...] = ()) -> None:
    """A usage error for the first numeric flag out of range: `at_least` {dest: lowest value},
    `above_zero` dests that must be > 0. Unset (None) flags pass; NaN fails every bound."""
    bounds = [(dest, ">=", lo) for dest, lo in at_least.items()] + [(dest, ">", 0) for dest in above_zero]
    for dest, op, lo in bounds:
        value = getattr(args, dest)
        if value is not None and not (value >= lo if op == ">=" else value > lo):
            parser.error(f"--{dest.replace('_', '-')} must be {op} {lo}, got {value}")
