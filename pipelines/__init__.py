"""The Dagster layer of the SFD pipeline: one cached asset per stage program of ``sfd_core``.

Start at ``definitions`` (the ``defs``), ``stages`` (which program builds which asset), ``profiles`` (the stage
configs, ``profiles/*.yaml``) and ``staging`` (the one fingerprint-and-cache mechanism). ``python -m pipelines.demo``
runs the graph up to the FID report. No torch here: stage programs run as subprocesses (``pipes_entry``).
"""
