"""Strictly private: the payments service and page that ``idempo demo`` serves (see ``docs/demo.md``)."""

from __future__ import annotations

from .app import SLOW_SECONDS, Ledger, create_app

__all__ = ["SLOW_SECONDS", "Ledger", "create_app"]
