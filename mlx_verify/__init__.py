"""mlx-verify: does an mlx-lm model port compute the same function as transformers?

One package namespace over the project's folders (pyproject.toml maps them): the engine
and CLI `mlx_verify.checks` (checks/), the runner side `mlx_verify.workers` (workers/)
and the GitHub App `mlx_verify.app` (app/), so no top-level `checks` or `app` package of
ours lands in site-packages.
"""
