"""One module per task: build its arrays from the package that ships the data (see prepared.py)."""
