"""What users run: the command line, the web server and API, annotated copies and the streamed
output files of `predict`. Torch-free; training commands reach `facegender.training` only when run."""
