"""Parallelism: sequence layouts, LASP-2, softmax sequence parallelism, pipeline, collectives."""
