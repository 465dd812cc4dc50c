"""Data access: sharded connection pools and versioned migrations."""
