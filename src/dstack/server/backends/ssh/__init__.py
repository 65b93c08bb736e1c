"""The `ssh` backend: the user's own hosts, reached over SSH (dstack's SSH fleets)."""
