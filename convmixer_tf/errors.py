"""The library's own exceptions, in one module that imports nothing (no TensorFlow), so the
CLI's exit-code table (`cli.EXIT_CODES`) names the classes themselves."""


class ExportError(RuntimeError):
    """An export failed or did not validate; what was published before is untouched."""


class FinalSaveError(OSError):
    """Training finished but writing the model file set failed (the message says where the
    trained weights are)."""
