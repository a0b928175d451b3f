"""pycma reference runs, in a fresh single-threaded interpreter (multithreaded BLAS crawls on a shared CPU)."""

import json
import sys

import numpy as np


def rosen(x):
    return float((100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())


def sphere(x):
    return float((x**2).sum())


if __name__ == "__main__":
    import cma

    name, n, lam, sigma, budget, seed = sys.argv[1], *map(int, sys.argv[2:4]), float(sys.argv[4]), *map(
        int, sys.argv[5:7])
    f = {"rosen": rosen, "sphere": sphere}[name]
    opts = {"popsize": lam, "seed": seed, "verbose": -9, "tolfun": 0, "tolx": 0, "tolfunhist": 0,
            "tolflatfitness": 1e9, "tolstagnation": 1e9, "tolconditioncov": 1e30}
    es = cma.CMAEvolutionStrategy(np.zeros(n), sigma, opts)
    while es.countevals < budget:
        X = es.ask()
        es.tell(X, [f(x) for x in X])
    print(json.dumps({"best": es.best.f, "evals": es.countevals}))
