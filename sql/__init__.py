"""pgmeter's SQL: numbered migrations and per-meter templates, shipped as package data."""
