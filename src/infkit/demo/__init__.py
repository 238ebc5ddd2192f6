"""A real analysis on scikit-learn's bundled digits: attribution, mislabel detection, faithfulness.

``python -m infkit demo`` (or ``make demo``) runs it end to end on a laptop CPU in about a minute:

1. load the 8x8 digits (1,797 images, no download), stratified 80/20 split, standardise the
   pixels on the training split, and flip 5% of the training labels to a different class;
2. train an L2 multinomial logistic regression and a small tanh MLP in float64 with
   :func:`infkit.train_to_optimum` (a tight optimum of ``mean_i l_i + (l2/2)||theta||^2``);
3. for each model: the top proponents and opponents of a few test images; mislabel detection
   by self-influence (ROC AUC and the share of flipped labels found in the top 10%, next to
   the training loss as a baseline); and a faithfulness check against actual retraining: for
   one test image, the 30 training examples with the largest |IF| score on its loss are each
   left out and the model retrained, and the predicted changes of the test loss (IF and
   Newton step) are compared with the actual ones.

Everything lands in a run directory: ``summary.json`` (numbers and settings), CSV tables and
PNG plots. Indices are positions in the training split; CSVs also give the index in
``sklearn.datasets.load_digits()`` so each image can be found again.

The demo needs the ``demo`` extra (matplotlib and scikit-learn): ``pip install "infkit[demo]"``.
It is not imported by ``import infkit``.
"""

from infkit.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
