"""Interactive refinement of one structure's contour from clicks.

A clinician's positive clicks ("this is the structure") and negative clicks ("this is not") are
encoded as maps that reach a few slices above and below each click (:mod:`.encoding`); one 2D
refinement network for every structure of every model takes an axial CT slice, the structure's
current mask and the two click maps and returns the structure's new mask on that slice
(:mod:`.network`); :class:`.refiner.Refiner` recomputes only the slices the clicks reach. It is
trained and benchmarked with a simulated clinician who clicks at the centre of the largest error
region (:mod:`.simulator`).
"""
