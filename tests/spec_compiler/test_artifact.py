"""spec_compiler/artifact.py: manifest files, identity checks, corrupt-file refusal (no torch, no models)."""
import json

import pytest

from spec_compiler import artifact
from spec_compiler.artifact import ArtifactError


def make_artifact(tmp_path, plan=None, device=None, ckpt=None):
    d = tmp_path / "art"
    (d / "phases").mkdir(parents=True)
    (d / "phases" / "a.pt2").write_bytes(b"program bytes")
    ckpt = ckpt or tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "config.json").write_text("{}")
    ident = artifact.identity(device or artifact.cpu_identity(), {"target": str(ckpt), "drafter": None})
    artifact.write_manifest(d, {"plan": plan or {"name": "p", "tree_parents": (-1, 0)}, "identity": ident})
    return d, ckpt


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    d, _ = make_artifact(tmp_path)
    m = artifact.read_manifest(d)
    assert m["files"] == {"phases/a.pt2": artifact.sha256_file(d / "phases" / "a.pt2")}
    assert m["artifact_version"] == artifact.ARTIFACT_VERSION
    artifact.verify_files(d, m)  # intact


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_or_missing_file_is_refused_by_name(tmp_path, damage):
    d, _ = make_artifact(tmp_path)
    f = d / "phases" / "a.pt2"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:3])
    elif damage == "flip":
        f.write_bytes(b"Program bytes")
    else:
        f.unlink()
    with pytest.raises(ArtifactError) as e:
        artifact.verify_files(d, artifact.read_manifest(d))
    assert e.value.where == str(f)
    assert ("sha256" in e.value.reason) != (damage == "delete")


def test_no_manifest_is_an_unfinished_build_and_bad_json_an_error(tmp_path):
    assert artifact.read_manifest(tmp_path) is None
    (tmp_path / artifact.MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        artifact.read_manifest(tmp_path)


def test_check_names_every_difference(tmp_path):
    d, ckpt = make_artifact(tmp_path)
    m = artifact.read_manifest(d)
    want = artifact.identity(artifact.cpu_identity(), {"target": str(ckpt), "drafter": None})
    assert artifact.check(m, {"name": "p", "tree_parents": [-1, 0]}, want) == []
    # another plan field
    diffs = artifact.check(m, {"name": "p", "tree_parents": [-1, 0, 0]}, want)
    assert len(diffs) == 1 and diffs[0].startswith("plan.tree_parents")
    # another device
    gpu = dict(want, device={"kind": "cuda", "name": "NVIDIA H200", "capability": "9.0"})
    diffs = artifact.check(m, {"name": "p", "tree_parents": [-1, 0]}, gpu)
    assert len(diffs) == 1 and "device" in diffs[0] and "NVIDIA H200" in diffs[0] and "CPU" in diffs[0]
    # another library version
    old = json.loads(json.dumps(m))
    old["identity"]["versions"]["torch"] = "2.11.0+cu128"
    diffs = artifact.check(old, {"name": "p", "tree_parents": [-1, 0]}, want)
    assert diffs == [f"torch: built with 2.11.0+cu128, this machine has {want['versions']['torch']}"]


def test_checkpoint_changed_in_place_is_a_difference(tmp_path):
    d, ckpt = make_artifact(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"weightz")  # same path, same size, new content
    want = artifact.identity(artifact.cpu_identity(), {"target": str(ckpt), "drafter": None})
    diffs = artifact.check(artifact.read_manifest(d), {"name": "p", "tree_parents": [-1, 0]}, want)
    assert diffs == ["target checkpoint: model.safetensors changed since the build (sha256)"]


def test_cpu_identity_names_model_and_isa():
    ident = artifact.cpu_identity()
    assert ident["kind"] == "cpu" and ident["arch"] and ident["name"]
    assert set(ident["isa"]) <= set(artifact.ISA_FLAGS)
