"""Pretrained models shipped inside the package: ``pretrained:<name>`` wherever a checkpoint goes.

A Conv4-64 ProtoNet teacher meta-trained on KanjiVG, and the Conv4-16 student distilled from it,
as small checkpoint files beside ``manifest.json`` (what each is, how it was trained, in how long,
and what it measured, each number with its command). Nothing is downloaded::

    metakd pretrained                                              # the table
    metakd test --config configs/kanji/protonet.yaml --ckpt_path pretrained:kanji-protonet-conv4-64
    metakd finetune --checkpoint pretrained:kanji-student-conv4-16 --data_root my_symbols/

    from lightning_metakd import load_learner
    learner = load_learner("pretrained:kanji-student-conv4-16")

and ``model.init_args.teacher: pretrained:kanji-protonet-conv4-64`` in a distillation config.
:mod:`~lightning_metakd.pretrained.registry` holds the names (no torch);
``scripts/pretrain.py`` trains and packages the models; docs/pretrained.md has the numbers.
"""

from lightning_metakd.pretrained.registry import (
    SCHEME,
    UnknownPretrainedModel,
    manifest,
    models,
    name_of,
    weights_file,
)

__all__ = ["SCHEME", "UnknownPretrainedModel", "manifest", "models", "name_of", "weights_file"]
