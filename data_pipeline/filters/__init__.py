"""Filters: language id and the Gopher, C4 and FineWeb quality rules, each a small step."""
