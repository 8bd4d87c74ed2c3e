"""vsmmu benchmarks: ``python -m benchmarks --cache .cache`` (``make bench``).

B1 boot to first DMA and B2 DMA throughput (ours vs QEMU's SMMUv3), B3 trap
round trip (ours vs QEMU's SMMUv3 vs a unix-socket floor), B4 command
throughput and B5 translation throughput in-process.  Each benchmark module
has ``run(settings) -> Section``; :mod:`benchmarks.report` holds the figures,
the table, the JSON and the issue's targets.
"""
