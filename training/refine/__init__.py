"""Training and benchmarking of the click refinement network (:mod:`contourcl.refine`)."""
