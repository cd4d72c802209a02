"""The MiDashengLM authors' published efficiency numbers, which the benchmarks reproduce.

Setup of both sources: one 80 GB GPU, bf16, 30 s clips, exactly 100 output tokens;
"batch" is the number of clips processed together.
"""

# samples/s by batch size, from the model card (README).
README_SAMPLES_PER_S = {1: 0.45, 4: 1.40, 8: 2.72, 16: 5.18, 32: 9.78, 64: 17.07, 128: 22.73, 200: 25.15}

# samples/s by batch size, from the technical report.
REPORT_SAMPLES_PER_S = {1: 0.65, 4: 2.42, 8: 4.67, 16: 8.93, 32: 14.36, 64: 19.54, 128: 24.26, 512: 29.04}

# The report's TTFT figure: batch 1, audio of 2..32 s in 2 s steps. Only the range over
# all lengths is read off the figure, not per-length values.
TTFT_CLIP_SECONDS = list(range(2, 33, 2))
TTFT_RANGE_MS = {"MiDashengLM": (34.0, 40.0), "Qwen2.5-Omni": (153.0, 238.0)}
