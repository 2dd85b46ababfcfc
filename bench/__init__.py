"""The project's benchmark suite, beside the product: its modules run with `python -m`.

    python -m bench.run                 # against two grpcio baselines (`nox -s bench`)
    python -m bench.preprocess_speed    # preprocessing's cost per input kind
    python -m bench.profile             # where a request's CPU goes (py-spy)
    python -m bench.scaleout            # three replicas behind nginx, drained, killed, restarted
    python -m bench.soak                # mixed, hostile traffic; memory stays flat

Run them from the repository root: they import `training` and `export`, which ship only in the
checkout, and start their servers and baselines (`python -m bench.baseline_threadpool`, ...)
there. Latency percentiles come from `mnist_service.loadgen.latency`, the project's one
definition.
"""
