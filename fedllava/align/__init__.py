"""Stage 3, global alignment on the server (paper Sec. 3.3, Eq. 5-6).

The aggregated model is fine-tuned on a small class-balanced set D_align held by the server:

  w_agg_new <- w_agg - eta * grad_w L_align(w_agg; D_align)               (Eq. 5)
  L_align = CE(y, p) + beta * KL(softmax(q / T) || softmax(p / T))       (Eq. 6)

with p the FL model's logits and q CLIP's zero-shot logits of the same image. D_align is
``align.per_class`` images of every class held out of the training pool *before* the long
tail (``data/federated.py``; never given to a client, never in the test set), or a user's own
folder of labelled images (``align.data_dir``; one sub-folder per class, named readably or by the
data set's label string; checked in ``validate``). q is computed once and cached on disk, keyed
by the images, the teacher and the prompts; the prompts name the classes readably
(``classnames.get_classnames``: "a photo of a tench.", never a synset id or a digit).

Choices (config fields, defaults with the reason):
  * ``align.params = "all"``: Eq. 5 moves every weight of w_agg; ``"head"`` moves the
    classifier only (backbone, feature MLP and BN statistics stay bit-identical).
  * ``align.when = "end"``: once after the last round, so the report compares the very same
    FedAvg model with and without alignment (the paper's Fig. 4); ``"every_round"`` aligns
    after each aggregation and clients receive the aligned model (``main.py`` passes
    ``make_round_hook`` to stage 2, which never imports this module).
  * ``align.bn = "train"``: BN uses batch statistics and updates its running statistics, as a
    PyTorch model in ``model.train()`` (the paper's code base) does when fine-tuned; D_align is
    class-balanced, so the running statistics move towards the balanced test distribution.
    ``"frozen"`` keeps them (eval-mode BN). Head-only alignment always freezes BN.
  * A fresh optimizer state for every alignment (like the clients' fresh local SGD).
  * Augmentation as in stage 2 (``data.crop_padding``, ``data.flip``, ``data.per_batch_augment``).

``run(config, workdir, init)`` aligns stage 2's model (``when="end"``) and writes under its
stage directory ``checkpoints/``, ``report.json`` and ``confusion.png``; a complete stage is
loaded, not rerun.

Modules: ``loss.py`` (Eq. 6 and the aligner on ``fedllava.supervised``'s epoch loop),
``fedllava/zero_shot.py`` (class names for the prompts, zero-shot q and its cache), ``stage.py``
(``validate``, ``run``, ``make_round_hook``); the user-folder loader is data loading
(``fedllava/data/folder.py``).
"""

from fedllava.align.loss import alignment_loss, create_aligner
from fedllava.align.stage import (
  BN_MODES,
  OPTIMIZERS,
  PARAMS,
  REPORT,
  WHEN,
  align_set,
  make_round_hook,
  run,
  validate,
)
from fedllava.align.stage import _prepare as _prepare  # tests build the context
from fedllava.data.folder import AlignSet, check_folder, folder_index, load_folder
from fedllava.zero_shot import class_names, readable_names, zero_shot_q

__all__ = [
  "BN_MODES",
  "OPTIMIZERS",
  "PARAMS",
  "REPORT",
  "WHEN",
  "AlignSet",
  "align_set",
  "alignment_loss",
  "check_folder",
  "class_names",
  "create_aligner",
  "folder_index",
  "load_folder",
  "make_round_hook",
  "readable_names",
  "run",
  "validate",
  "zero_shot_q",
]
