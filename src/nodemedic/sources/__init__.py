"""Event sources: turn the world into events. No policy logic lives here."""
