"""Shipped recipes (package data for `plugtune recipes`)."""
