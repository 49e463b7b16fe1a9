"""Where candidates are scored: in this process, or on a pool of Ray actors.

Each pool holds stateful evaluators (model, level database, calibration batches, the original's
outputs): built once, then asked for scores of many candidates. Both pools return the same
scores in the same order; Ray only spreads the candidates over its actors.

Pointing at an existing Ray cluster: ``slimformer search ... --ray ray://head-node:10001`` (or
``--ray auto`` inside a cluster, where ``RAY_ADDRESS`` is set); every node needs slimformer
installed and the level database folder on a shared path. ``--ray local`` starts a local Ray
with ``--workers`` actors.
"""

from __future__ import annotations

from slimformer.errors import ConfigError
from slimformer.search.fitness import Evaluator


class LocalPool:
    """One evaluator in this process."""

    workers = 1

    def __init__(self, loaded, database, batches, reference, threads: int | None = None, units=None, dtype: str = "float32",
                 fitness: str = "kl") -> None:
        self.evaluator = Evaluator(loaded, database, batches, reference, threads=threads, units=units, dtype=dtype, fitness=fitness)

    def score(self, candidates: list[list[int]], n_batches: int, fitness: str | None = None) -> list[float]:
        return self.evaluator.score_many(candidates, n_batches, fitness)

    def close(self) -> None:
        pass


class RayPool:
    """``workers`` Ray actors, each an :class:`Evaluator`; candidates are dealt round-robin."""

    def __init__(self, loaded, database, batches, reference, workers: int = 2, address: str = "local", threads: int | None = None, units=None,
                 dtype: str = "float32", fitness: str = "kl") -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs the 'ray' package", "install it: pip install -c constraints.txt 'slimformer[ray]'") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._started = True
        actor = ray.remote(num_cpus=1)(Evaluator)
        refs = [ray.put(x) for x in (loaded, str(database.folder), batches, reference)]
        self.actors = [actor.remote(*refs, threads=threads, units=units, dtype=dtype, fitness=fitness) for _ in range(workers)]
        self.workers = workers

    def score(self, candidates: list[list[int]], n_batches: int, fitness: str | None = None) -> list[float]:
        if not candidates:
            return []
        per_actor: list[list[int]] = [[] for _ in self.actors]
        for i in range(len(candidates)):
            per_actor[i % len(self.actors)].append(i)
        futures = [a.score_many.remote([candidates[i] for i in idx], n_batches, fitness) for a, idx in zip(self.actors, per_actor) if idx]
        results = self.ray.get(futures)
        scores = [0.0] * len(candidates)
        for idx, res in zip([i for i in per_actor if i], results):
            for i, s in zip(idx, res):
                scores[i] = s
        return scores

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()
