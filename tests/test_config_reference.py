"""docs/config.md is generated from the field comments (gannet.trainer.config.reference): it must
match what the generator writes today, name every key of every bundled config, and a field without
a comment must stop the generator rather than leave a blank meaning."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gannet.trainer.config import reference
from gannet.trainer.config.loader import config_names, config_to_dict, load_config
from tests.conftest import REPO

DOC = REPO / "docs" / "config.md"


def test_docs_config_md_is_what_the_generator_writes():
    assert DOC.read_text() == reference.render(), (
        "docs/config.md is stale: regenerate it with `make docs` "
        "(python -m gannet.trainer.config.reference > docs/config.md)")


def dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


@pytest.mark.parametrize("name", config_names())
def test_every_key_of_a_bundled_config_has_a_row(name):
    text = DOC.read_text()
    for key in dotted_keys(config_to_dict(load_config(name))):
        row = key.replace("optim.g.", "optim.X.").replace("optim.d.", "optim.X.")
        assert f"| `{row}` |" in text or key == "recipe.name", f"{name}: {key} is not in docs/config.md"


@dataclass
class Documented:
    plain: int = 1  # said at the end of the line
    # said above the field,
    # over two lines
    above: str = ""
    silent: float = 0.5


def test_a_fields_meaning_is_its_comment_and_a_missing_one_is_an_error():
    assert reference.field_comments(Documented) == {
        "plain": "said at the end of the line", "above": "said above the field, over two lines", "silent": ""}
    assert reference.meaning(Documented, "above") == "said above the field, over two lines"
    with pytest.raises(ValueError, match="Documented.silent has no comment"):
        reference.meaning(Documented, "silent")
