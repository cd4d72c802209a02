"""Offline batch jobs: caption or transcribe a whole dataset through an in-process engine.

`mdl-serve batch INPUT --output OUT.jsonl` (see docs/batch.md). The input is streamed row
by row, audio is decoded in a process pool ahead of the engine, every finished row is
appended and flushed, and a rerun skips the ids already in the output.
"""
