"""A reward module whose own code fails while it is imported (loaded by path in tests). An
AttributeError, so that it is not mistaken for a missing function."""

raise AttributeError("this module fails on purpose while it is imported")
