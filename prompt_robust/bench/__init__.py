"""The synthetic benchmark: a procedural world, its tasks, the mini-CLIP's pretraining and the ``bench`` suites.

A leaf package: it uses the library (learners, add-ons, training, metrics) like any user would, and nothing
outside it (but the command line and the docs generator) imports it, so the library never depends on the world
it is measured on.

* :mod:`.world`, :mod:`.world_v2`: the procedural image-caption world (classes, styles, backgrounds, patterns);
* :mod:`.tasks`: the benchmark's tasks on it (base-to-new, domain generalisation, spurious, retrieval,
  cross-dataset);
* :mod:`.pretrain`: contrastive pretraining of the embedded mini-CLIP (``prompt-robust pretrain-backbone``);
  the shipped weights' location is core (:mod:`prompt_robust.backbones.embedded`);
* :mod:`.runner`: the protocol, every method x task x seed (:class:`~.runner.BenchConfig`), and :mod:`.report`,
  its tables, plots and sanity checks;
* :mod:`.suites`: what ``prompt-robust bench --suite NAME`` runs, registered in :data:`.suites.SUITES`.
"""
