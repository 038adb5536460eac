"""The collector's sources; each turns what it reads into records with deterministic ids."""
