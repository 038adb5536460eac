"""Tests of the bp-pgmeter Helm chart, Blueprint and Dockerfile (offline, no cluster)."""
