"""Run management for the example pipelines, kept out of them so that each reads as its algorithm.

Not part of the library: a user who writes their own training loop needs none of it. Modules:

- ``config``: :class:`~pipeline.config.Config` (every option and its default), the presets, the
  command line;
- ``data``: each preset's datasets, class names, the deterministic and resumable batch order;
- ``training``: model, selector, optimiser and schedule, AMP, micro-batches, DDP, seeding;
- ``runs``: the run folder's configuration check, cached results, the JSON-lines metrics log,
  resumable training state (checkpoints, RNG streams);
- ``stages``: one training stage's run management (:class:`~pipeline.stages.StageRun`) and the
  evaluation of a stage's model;
- ``progress``: progress bars for a terminal or a redirected log;
- ``report``: results tables and plots, mean ± std over seeds;
- ``source``: stages 1 and 2 (source-only, adversarial warm-up);
- ``selection``: label-free model selection after each round (``--select``, ``--patience``);
- ``collapse``: per-round collapse diagnostics and the guard that acts (``--collapse-guard``);
- ``experiments``: the ablation table and runs over several seeds.

Functions here raise :class:`RunError` for a problem the user can fix (a damaged file, a run folder
made with other options, a missing dataset root); the examples' ``main`` turns it into a message
and exit status 1.
"""

from __future__ import annotations


class RunError(Exception):
    """A problem with the run the user can fix; the message says how."""
