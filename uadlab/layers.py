"""Blocks shared by several methods (a block used by one method stays in that method's file)."""
from __future__ import annotations
