"""A minimal Django project that ships a new recommendation engine to a deterministic slice of its users."""
