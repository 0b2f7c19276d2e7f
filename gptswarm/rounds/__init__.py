"""The round protocol that the coordinator and every worker apply the same way: averaging through
hivemind (averaging.py, with the hivemind adaptation fenced in hivemind_ext.py), the outer step
(outer.py) and theta_global on disk and its hash (theta.py). Importing this package imports no
hivemind; its modules do."""

COMPRESSIONS = ("none", "fp16", "8bit", "4bit", "topk")  # how pseudo-gradients travel; hivemind_ext.CODECS implements each
DEFAULT_TOPK = 0.03  # a "topk" run's default fraction of values sent (SparseLoCo: 1-3%)
# the outer Nesterov SGD's (learning rate, momentum) by codec: DiLoCo's, except for top-k, whose error
# feedback sends most of a pseudo-gradient rounds later and wants a larger step (bench/README.md)
OUTER_DEFAULTS = {"topk": (4.0, 0.0)}
DILOCO_OUTER = (0.7, 0.9)


def outer_defaults(compression):
    return OUTER_DEFAULTS.get(compression, DILOCO_OUTER)
AGGREGATIONS = ("robust", "mean")  # how the coordinator reduces them: robust.py's rule, or the plain weighted mean
