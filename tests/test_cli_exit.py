"""A verb run under a launcher leaves no process group behind: gloo's threads would abort the
process at interpreter exit (SIGABRT after the work is saved) and fail the whole launch."""

from __future__ import annotations

import argparse

import torch.distributed as dist

import csplade.cli as cli


def _parser_with(func) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csplade")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb")
    sub.add_parser("probe").set_defaults(func=func)
    return parser


def test_main_destroys_the_process_group_a_verb_left(monkeypatch, tmp_path):
    seen = {}

    def verb(args):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        seen["initialized"] = dist.is_initialized()
        return 0

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(verb))
    try:
        assert cli.main(["probe"]) == 0
        assert seen["initialized"]
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_main_without_a_process_group_returns_the_verbs_code(monkeypatch):
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(lambda args: 3))
    assert cli.main(["probe"]) == 3
    assert not dist.is_initialized()
