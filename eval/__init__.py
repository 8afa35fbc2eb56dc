"""Benchmarks, prompts and sandboxed evaluation for the SPA harness.

Data flows one way: ``data`` (EvalPlus tasks) -> ``spans`` (typed prompt spans) -> ``prompts``
(rendered prompts with anchor character spans) -> generation (``spa``) -> ``postprocess`` ->
``sandbox`` / ``evaluate`` (verdicts) -> ``report`` (tables and figures).
"""
