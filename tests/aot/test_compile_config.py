"""compile.* / hardware / backend=compiled settings that cannot work are refused before anything loads (exit 2)."""
import pytest

import main
from aot.tensorrt import available, compile_tensorrt
from spec_compiler.errors import ConfigError


@pytest.mark.parametrize("overrides,key", [
    (["hardware=h200"], "hardware"),
    (["hardware=cpu", "backend.device=cuda"], "backend.device"),
    (["compile.backends=[eager,tensorrt]"], "compile.backends"),
    (["compile.backends=[]"], "compile.backends"),
    (["compile.repeats=0"], "compile.repeats"),
    (["compile.roles=[verifier]"], "compile.roles[0]"),
    (["compile.batch_sizes=[0]"], "compile.batch_sizes[0]"),
    (["compile.artifact=/no/such/dir"], "compile.artifact"),
    (["compile.calibration_prompts=/no/such.jsonl"], "compile.calibration_prompts"),
])
def test_bad_compile_settings_exit_2_naming_the_key(overrides, key, capsys):
    code = main.cli(["task=compile", "target=tiny_random", "drafter=noisy_copy", "tree=chain"] + overrides)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {key}"), err
    if key == "hardware":
        assert "H200" in err and "no CUDA device" in err


@pytest.mark.skipif(available(), reason="torch_tensorrt is installed")
def test_tensorrt_backend_is_import_gated():
    with pytest.raises(ConfigError, match="torch_tensorrt"):
        compile_tensorrt(None, [], None)
