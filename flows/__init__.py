"""Prefect flows. They only compose DVC stages; no ML code lives here."""
