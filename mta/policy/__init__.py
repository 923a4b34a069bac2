"""mta package."""
