"""docs/options.md lists every option of the Refiner, the CLI and the Detectron2 config, and is what the definitions
give (tools/maintain/options_doc.py writes it)."""
import importlib.util
from pathlib import Path

import pytest

from crm_d2.cli import command_parsers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def options_doc():
    spec = importlib.util.spec_from_file_location("options_doc", ROOT / "tools" / "maintain" / "options_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_has_a_row_and_every_row_an_option(options_doc):
    missing, unknown = options_doc.coverage()
    assert missing == [] and unknown == []
    assert options_doc.refine_batch_matches_refine()


def test_the_page_is_what_the_definitions_give(options_doc):
    written = (ROOT / "docs" / "options.md").read_text()
    assert written == options_doc.render(), "docs/options.md is stale: run python tools/maintain/options_doc.py"


def test_the_page_names_each_option_under_its_three_names(options_doc):
    text = (ROOT / "docs" / "options.md").read_text()
    line = next(row for row in text.splitlines() if row.startswith("| `Refiner(grabcut=)`"))
    assert "`--grabcut` (demo, instances, panoptic, refine)" in line and "`MODEL.CRM.GRABCUT`" in line
    line = next(row for row in text.splitlines() if "`MODEL.CRM.ROI_MARGIN`" in row)
    assert line.startswith("| `refine(margin=)` `SegmentRefineOptions(margin=)` | `--margin`")
    assert "| 0.5 |" in line  # the same default under all names: shown once


def test_a_new_cli_option_refiner_argument_or_d2_key_without_a_row_is_named(options_doc, monkeypatch, tmp_path):
    real_parser = options_doc.build_parser

    def parser_with_a_new_flag():
        parser = real_parser()
        command_parsers(parser)["refine"].add_argument("--new-knob", type=int, default=3)
        return parser

    monkeypatch.setattr(options_doc, "build_parser", parser_with_a_new_flag)

    def refiner_init(self, weights="demo", device=None, shiny=True):
        pass

    monkeypatch.setitem(options_doc.PYTHON, "Refiner", refiner_init)
    config = tmp_path / "config.py"
    config.write_text(options_doc.D2_CONFIG.read_text().replace(
        "    return cfg\n", "    # A new key.\n    cfg.MODEL.CRM.NEW_KEY = 1\n    return cfg\n", 1))
    monkeypatch.setattr(options_doc, "D2_CONFIG", config)
    missing, unknown = options_doc.coverage()
    assert "crm-d2 refine --new-knob" in missing and "Refiner.shiny" in missing and "MODEL.CRM.NEW_KEY" in missing
    assert "Refiner.scales" in unknown  # the stand-in Refiner lost arguments that rows name
    assert options_doc.main(["--check"]) == 1


def test_d2_defaults_are_read_without_detectron2(options_doc):
    from crm_d2.panoptic.refine import SegmentRefineOptions

    d2 = options_doc.d2_options()
    assert d2["MIN_AREA"][0] == SegmentRefineOptions().min_area and d2["ENABLED"][0] is True
    assert "Segments smaller than this" in d2["MIN_AREA"][1]


def test_d2_keys_read_from_source_are_those_add_crm_config_sets(options_doc, monkeypatch):
    """Without detectron2: crm_d2/d2/config.py's `add_crm_config` run on a stand-in for detectron2's CfgNode sets
    exactly the keys and values that the options page reads from its source (with detectron2 installed, the
    test below checks the same on the real config)."""
    import importlib.util
    import sys
    import types

    class CfgNode(dict):  # the part of detectron2's CfgNode that add_crm_config uses: attribute access
        __getattr__, __setattr__ = dict.__getitem__, dict.__setitem__

    fake = types.ModuleType("detectron2.config")
    fake.CfgNode, fake.get_cfg = CfgNode, lambda: CfgNode(MODEL=CfgNode())
    monkeypatch.setitem(sys.modules, "detectron2", types.ModuleType("detectron2"))
    monkeypatch.setitem(sys.modules, "detectron2.config", fake)
    spec = importlib.util.spec_from_file_location("crm_d2_d2_config_alone", options_doc.D2_CONFIG)
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    built = config.add_crm_config(fake.get_cfg()).MODEL.CRM
    read = options_doc.d2_options()
    assert sorted(built) == sorted(read) and len(read) > 10
    assert all(built[k] == read[k][0] and type(built[k]) is type(read[k][0]) for k in read)


def test_d2_keys_read_from_source_are_those_detectron2_builds(options_doc):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; README, Detectron2)")
    from detectron2.config import get_cfg

    from crm_d2.d2.config import add_crm_config

    built = add_crm_config(get_cfg()).MODEL.CRM
    read = options_doc.d2_options()
    assert sorted(built) == sorted(read)
    assert all(built[k] == read[k][0] for k in read)
