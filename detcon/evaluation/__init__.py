"""Offline evaluation of frozen torsos: kNN, linear and dense segmentation probes."""
