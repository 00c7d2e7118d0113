"""Configs of common GPT-class models (config.json contents), so that `plugtune plan` works offline by hub id; index.json maps hub ids to files."""
