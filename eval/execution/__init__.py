"""The executor: untrusted programs run in a bubblewrap sandbox, judged outside it (docs/executor.md).

One job per file: ``sandbox`` (the launcher: bwrap, seccomp, cgroups, limits measured from outside),
``child`` (what runs inside: the program, its outputs streamed as plain data; standard library only),
``judge`` (outside: a safe plain-data reader and EvalPlus's comparison and oracles), ``groundtruth``
(the canonical solutions' outputs, cached), ``evaluate`` (samples in, eval_results.json out) and ``pool``
(the worker threads both of the last two run on).
"""
