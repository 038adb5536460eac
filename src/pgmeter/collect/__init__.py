"""``pgmeter collect``: source -> mapping -> disk buffer -> delivery to an OpenMeter-compatible endpoint."""
