"""Compiled-artifact directories keyed by configuration: reuse, refusal with a diff, no deletion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_kimi_neuron.artifacts import (
    CONFIG_FILE,
    KEY_FILE,
    MODEL_FILE,
    StaleArtifactsError,
    artifact_key,
    choose,
    config_diff,
    mark_complete,
)

REQUEST = {"tp_degree": 64, "batch_size": 8, "router_config": {"act_fn": "sigmoid", "dtype": "float32"},
           "torch_dtype": "bfloat16", "context_encoding_buckets": [128, 1024]}
VERSIONS = {"neuronx-distributed-inference": "0.9.17334", "vllm-neuron": "0.5.0"}


def _compiled(directory: Path, neuron_config: dict) -> None:
    """What NxDI leaves after a finished compile: its config (with keys of its own) and model.pt."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = {**neuron_config, "torch_dtype": "torch.bfloat16", "n_active_tokens": 1024}
    (directory / CONFIG_FILE).write_text(json.dumps({"neuron_config": stored, "hidden_size": 7168}))
    (directory / MODEL_FILE).write_bytes(b"traced")
    mark_complete(directory)


def test_key_changes_with_every_input() -> None:
    base = artifact_key("rev", REQUEST, VERSIONS)
    assert base == artifact_key("rev", dict(reversed(REQUEST.items())), VERSIONS)  # order does not matter
    assert base != artifact_key("rev2", REQUEST, VERSIONS)
    assert base != artifact_key("rev", {**REQUEST, "batch_size": 16}, VERSIONS)
    assert base != artifact_key("rev", REQUEST, {**VERSIONS, "vllm-neuron": "0.5.1"})


def test_new_configuration_compiles_then_is_reused(tmp_path: Path) -> None:
    first = choose(tmp_path, "rev", REQUEST, VERSIONS)
    assert first.action == "compile" and first.directory.parent == tmp_path
    assert json.loads((first.directory / KEY_FILE).read_text())["neuron_config"] == REQUEST
    _compiled(first.directory, REQUEST)
    again = choose(tmp_path, "rev", REQUEST, VERSIONS)
    assert again.action == "reuse" and again.directory == first.directory and "reusing" in again.note
    other = choose(tmp_path, "rev", {**REQUEST, "batch_size": 16}, VERSIONS)
    assert other.action == "compile" and other.directory != first.directory
    assert (first.directory / MODEL_FILE).exists()  # nothing of the other configuration was touched


def test_stored_config_that_disagrees_is_refused_with_a_diff(tmp_path: Path) -> None:
    directory = choose(tmp_path, "rev", REQUEST, VERSIONS).directory
    _compiled(directory, {**REQUEST, "batch_size": 4})
    with pytest.raises(StaleArtifactsError, match=r"batch_size: stored 4, requested 8") as err:
        choose(tmp_path, "rev", REQUEST, VERSIONS)
    assert "nothing was deleted" in str(err.value)
    assert (directory / MODEL_FILE).exists()


def test_user_artifacts_dir_is_checked_against_the_request(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    assert choose(tmp_path / "root", "rev", REQUEST, VERSIONS, user_dir=user).action == "compile"
    _compiled(user, {**REQUEST, "router_config": {"act_fn": "softmax", "dtype": "float32"}})
    expected = r"router_config\.act_fn: stored 'softmax', requested 'sigmoid'"
    with pytest.raises(StaleArtifactsError, match=expected):
        choose(tmp_path / "root", "rev", REQUEST, VERSIONS, user_dir=user)
    _compiled(user, REQUEST)
    assert choose(tmp_path / "root", "rev", REQUEST, VERSIONS, user_dir=user).action == "reuse"


def test_interrupted_compile_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    directory = choose(tmp_path, "rev", REQUEST, VERSIONS).directory
    (directory / CONFIG_FILE).write_text("{}")  # the compile died before model.pt
    decision = choose(tmp_path, "rev", REQUEST, VERSIONS)
    assert decision.action == "compile" and "moved to" in decision.note
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(directory.name + ".incomplete-")]
    assert len(aside) == 1 and (aside[0] / CONFIG_FILE).exists()


def test_model_pt_without_the_completion_mark_is_unfinished(tmp_path: Path) -> None:
    """NxDI writes model.pt before it shards the weights: a compile killed while sharding has one."""
    directory = choose(tmp_path, "rev", REQUEST, VERSIONS).directory
    (directory / CONFIG_FILE).write_text(json.dumps({"neuron_config": REQUEST}))
    (directory / MODEL_FILE).write_bytes(b"traced")
    decision = choose(tmp_path, "rev", REQUEST, VERSIONS)
    assert decision.action == "compile" and "moved to" in decision.note
    user = tmp_path / "mine"
    _compiled(user, REQUEST)
    (user / "kimi_neuron_compiled.json").unlink()
    with pytest.raises(StaleArtifactsError, match=r"no finished compile .*nothing was deleted"):
        choose(tmp_path / "root", "rev", REQUEST, VERSIONS, user_dir=user)
    assert (user / MODEL_FILE).exists()


def test_diff_normalises_dtype_names_and_ignores_keys_nxdi_adds() -> None:
    stored = {"torch_dtype": "torch.bfloat16", "buckets": [128], "extra": 1, "nested": {"a": (1, 2)}}
    assert config_diff(stored, {"torch_dtype": "bfloat16", "nested": {"a": [1, 2]}}) == []
    assert config_diff(stored, {"missing": 1}) == ["missing: not stored, requested 1"]
