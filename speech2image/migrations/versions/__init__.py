"""One file per schema change, named for what it does."""
