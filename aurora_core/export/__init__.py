"""Exporters: Prometheus metrics (``prometheus``) and Chrome-trace / Perfetto JSON (``perfetto``)."""
