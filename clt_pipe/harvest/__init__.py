"""Harvest: plan (layout and identity), loop (one process), dask (several writers), run (the command)."""
