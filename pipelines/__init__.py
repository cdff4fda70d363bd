"""Recipes: the end-to-end flows that wire `emloc`'s components to real models, one package per part.

    runner/     the run machine: settings, Run and its stages, progress, backend interface + registry, CLI
    flux/       FLUX.1 backend (diffusers)          internvl/   InternVL backend (transformers)
    planner/    will it fit? catalogue + planning   demo/       the shipped demo models: data, build, evaluation

Imports flow one way: app -> pipelines -> emloc; a backend imports only `pipelines.runner` and `emloc`.
tests/test_layout.py holds the tree to these rules.
"""
