"""`knob`: a config field with its `--help` line. Every job's typed config (training, export,
evaluation, ...) declares its settings with it, and the CLI makes each field a flag. Pure
Python, so `--help` answers before TensorFlow loads."""

import dataclasses


def knob(default, help):
    """A config field: its default and its `--help` line (the CLI reads `metadata["help"]`)."""
    return dataclasses.field(default=default, metadata={"help": help})
