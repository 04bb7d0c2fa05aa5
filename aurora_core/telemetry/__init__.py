"""Hardware telemetry on the request clock: NVML and CPU samplers, trace record/replay.

``sampler.TelemetrySampler`` runs the backends on daemon threads and hands ``records.Sample`` /
``records.Event`` objects to callbacks (a ``Recorder``, the Prometheus exporter). ``nvml`` is the GPU
backend, ``cpu`` the always-present host backend, ``replay`` records and replays NVML traces.
Submodules are imported on use so that ``import aurora_core.telemetry`` stays cheap.
"""
