"""The commands' ``--help``: a default is shown where it is a value, not where it means "not given"."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, less "(default: None)" / "(default: [])" and required options' defaults, and
    never twice: a help text that says its default itself is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default in (None, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
