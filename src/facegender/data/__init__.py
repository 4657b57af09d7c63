"""Datasets: class folders and their scans, sources with weights and caps, importers from other
layouts, face preparation (the aligned-face cache) and the one stratified splitter. Torch-free."""
