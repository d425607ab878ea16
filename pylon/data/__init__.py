"""Data: read radiographs, index the registered sources into Records, split by patient, cache
the pixels and feed them to the model. Import the modules themselves (this one loads nothing)."""
