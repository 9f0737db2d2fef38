"""Experiments on real CT: the label-efficiency benchmark and its report."""
