"""`python -m mdlserve.benchmarks ...`: the same commands as `mdl-serve bench ...`."""

from .cli import main

main()
