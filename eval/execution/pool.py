"""The thread pool that judges samples (``eval.execution.evaluate``) and computes expected outputs
(``eval.execution.groundtruth``): each thread drives one sandboxed child process."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm


def parallel(work, items: list, n_workers: int, progress: bool, description: str) -> list:
    """``[work(item) for item in items]`` on ``n_workers`` threads (each drives one child process)."""
    results: list = [None] * len(items)
    with ThreadPoolExecutor(max_workers=n_workers) as pool, tqdm(
        total=len(items), desc=description, disable=not progress, file=sys.stderr, leave=False
    ) as bar:
        futures = {pool.submit(work, item): k for k, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
