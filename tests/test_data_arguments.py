"""Every data source exposes all of EpisodicDataModule's arguments to LightningCLI.

Sources forward the base arguments with ``**kwargs`` instead of re-listing them; jsonargparse (the
parser behind ``metakd fit``) follows ``super().__init__(**kwargs)``. These tests pin that the
parser still lists each base argument under ``--data.<name>`` with the base type, default and help.
"""

from __future__ import annotations

import inspect

import docstring_parser
import pytest
from jsonargparse import ArgumentParser

import lightning_metakd.data as data
from lightning_metakd.data import EpisodicDataModule

SOURCES = sorted(
    (
        obj
        for obj in (getattr(data, name) for name in data.__all__)
        if inspect.isclass(obj)
        and issubclass(obj, EpisodicDataModule)
        and obj is not EpisodicDataModule
    ),
    key=lambda cls: cls.__name__,
)
BASE = {
    name: param
    for name, param in inspect.signature(EpisodicDataModule.__init__).parameters.items()
    if name != "self"
}
#: Base arguments a source may name itself, because its default or its handling differs.
OWN_OVERRIDES = {
    "FolderDataModule": {"image_size": 84},
    "MiniImageNetDataModule": {"image_size": 84, "train_transform": None, "eval_transform": None},
}
BASE_HELP = {
    p.arg_name: " ".join(p.description.split())
    for p in docstring_parser.parse(EpisodicDataModule.__doc__).params
}


def data_parser(cls: type) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    return parser


def test_every_source_is_covered():
    names = [cls.__name__ for cls in SOURCES]
    assert {"FolderDataModule", "KanjiDataModule", "MiniImageNetDataModule"} <= set(names)
    assert {"OmniglotDataModule", "Learn2LearnDataModule"} <= set(names)


def test_the_base_docstring_documents_every_argument():
    assert set(BASE_HELP) >= set(BASE), set(BASE) - set(BASE_HELP)


@pytest.mark.parametrize("cls", SOURCES, ids=lambda cls: cls.__name__)
def test_sources_forward_base_arguments_instead_of_relisting_them(cls):
    own = inspect.signature(cls.__init__).parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
    relisted = set(own) & set(BASE)
    assert relisted == set(OWN_OVERRIDES.get(cls.__name__, {})), relisted


@pytest.mark.parametrize("cls", SOURCES, ids=lambda cls: cls.__name__)
def test_cli_parser_lists_every_base_argument_with_type_default_and_help(cls):
    parser = data_parser(cls)
    defaults = parser.get_defaults().data
    help_text = " ".join(parser.format_help().split())
    overrides = OWN_OVERRIDES.get(cls.__name__, {})
    for name, param in BASE.items():
        expected = overrides.get(name, param.default)
        assert getattr(defaults, name) == expected, name
        assert f"--data.{name}" in help_text, name
        assert source_help(cls, name) in help_text, name
    # Types come from the base signature: a wrong value is refused with the argument's name.
    with pytest.raises(Exception, match="data.ways"):
        parser.parse_args(["--data.ways", "five", *required_args(cls)])


def source_help(cls: type, name: str) -> str:
    """The help the CLI should show for ``name``: the source's own doc where it names it."""
    if name in OWN_OVERRIDES.get(cls.__name__, {}):
        own = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
        return " ".join(own[name].split())
    return BASE_HELP[name]


def required_args(cls: type) -> list[str]:
    own = inspect.signature(cls.__init__).parameters
    required = [n for n, p in own.items() if n != "self" and p.default is inspect.Parameter.empty]
    required = [n for n in required if own[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return [arg for n in required for arg in (f"--data.{n}", "x")]


@pytest.mark.parametrize(
    "cls", [c for c in SOURCES if c.__name__ != "Learn2LearnDataModule"], ids=lambda c: c.__name__
)
def test_forwarded_arguments_reach_the_base_class(cls, tmp_path):
    """As ``metakd fit`` parses ``data: {class_path, init_args}`` (LightningCLI's subclass mode)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(EpisodicDataModule, "data")
    init_args = {"ways": 3, "test_ways": 4, "val_episodes": 7}
    if "root" in inspect.signature(cls.__init__).parameters:
        init_args["root"] = str(tmp_path)
    if cls.__name__ == "KanjiDataModule":
        init_args["cache_dir"] = str(tmp_path)
    config = {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": init_args}
    dm = parser.instantiate(parser.parse_object({"data": config})).data
    assert (dm.ways, dm.test_ways, dm.val_episodes) == (3, 4, 7)
    assert dm.hparams["ways"] == 3 and dm.hparams["val_episodes"] == 7
    with pytest.raises(Exception, match="ways"):
        parser.parse_object({"data": {**config, "init_args": {**init_args, "ways": "five"}}})
