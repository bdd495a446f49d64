"""Issue #27 items 6 and 8: a checkpoint whose metadata cannot make a GIT model, or whose weight index is
malformed or points outside its folder, is one checkpoint error at load time — exit 2 from the CLI,
naming the file and the field, with nothing created — never a failure in the middle of a run, a
traceback, or a read outside the checkpoint."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from gitfast.tools import cli
from gitfast.captioning import cli as caption_cli
from gitfast.defaults import EMBEDDED_MODEL, EXAMPLES

IMAGE = sorted(EXAMPLES.iterdir())[0]


def caption(*argv):
    parser = cli._Parser(prog="gitfast caption")
    caption_cli.configure(parser)
    extra = ["--max-new-tokens", "4", "--quiet", "--device", "cpu"]
    return caption_cli.run(parser.parse_args([str(a) for a in argv] + extra))


def refused(model, tmp_path, capsys):
    """Runs the CLI on `model`; asserts exit 2 and that the output's folder was not made; the message."""
    target = tmp_path / "new" / "o.jsonl"
    status = caption(IMAGE, "--model", model, "--out", target)
    err = capsys.readouterr().err
    assert status == 2, err
    assert not (tmp_path / "new").exists()
    return err


def edited_copy(tmp_path, file_name, edit):
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model)
    data = json.loads((model / file_name).read_text())
    edit(data)
    (model / file_name).write_text(json.dumps(data))
    return model


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads is 0"),
    (lambda c: c.update(num_attention_heads=3), "num_attention_heads 3 does not divide hidden_size 128"),
    (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size is 0"),
    (lambda c: c.update(hidden_size=-128), "hidden_size is -128"),
    (lambda c: c["vision_config"].update(image_size="80"), "image_size"),
])
def test_impossible_config_sizes_are_refused_at_load(tmp_path, capsys, edit, field):
    model = edited_copy(tmp_path, "config.json", edit)
    err = refused(model, tmp_path, capsys)
    assert f"{model}/config.json" in err and field in err


def test_a_layer_count_the_weights_do_not_hold_is_refused_before_building(tmp_path, capsys, monkeypatch):
    from gitfast import model as model_module

    def never(*args, **kwargs):
        raise AssertionError("a GitModel was built for a config its weights do not match")

    monkeypatch.setattr(model_module.GitModel, "__init__", never)
    model = edited_copy(tmp_path, "config.json", lambda c: c.update(num_hidden_layers=10**6))
    err = refused(model, tmp_path, capsys)
    assert "num_hidden_layers is 1000000, its weights hold 2" in err


def test_a_zero_image_size_in_the_processor_is_one_checkpoint_error(tmp_path, capsys):
    model = edited_copy(tmp_path, "preprocessor_config.json", lambda p: p["size"].update(shortest_edge=0))
    err = refused(model, tmp_path, capsys)
    assert "preprocessor_config.json's size.shortest_edge is 0" in err


def sharded_copy(tmp_path, weight_map=None, index_text=None):
    """The embedded model with its weights in one shard named by a safetensors index."""
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model)
    weights = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "part-1.safetensors")
    if index_text is None:
        index = {"metadata": {}, "weight_map": weight_map if weight_map is not None else
                 {name: "part-1.safetensors" for name in weights}}
        index_text = json.dumps(index)
    (model / "model.safetensors.index.json").write_text(index_text)
    return model, weights


@pytest.mark.parametrize("index, field", [
    ({"metadata": {}}, 'no "weight_map"'),
    ({"weight_map": {"output.weight": 7}}, "weight_map['output.weight'] is 7, not a file name"),
    ("{not json", "cannot read the weight index"),
])
def test_a_malformed_weight_index_names_the_file_and_the_field(tmp_path, capsys, index, field):
    text = index if isinstance(index, str) else json.dumps(index)
    model, _ = sharded_copy(tmp_path, index_text=text)
    err = refused(model, tmp_path, capsys)
    assert f"{model}/model.safetensors.index.json" in err and field in err


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_shards_outside_the_checkpoint_folder_are_never_read(tmp_path, capsys, monkeypatch, where):
    from gitfast.checkpoint import loading

    outside = tmp_path / "outside.safetensors"
    model, weights = sharded_copy(tmp_path)
    save_file(weights, str(outside))
    name = "../outside.safetensors" if where == "relative" else str(outside)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {tensor: name for tensor in weights}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = []
    real_load = load_file
    monkeypatch.setattr("safetensors.torch.load_file", lambda p, *a, **k: opened.append(p) or real_load(p, *a, **k))
    err = refused(model, tmp_path, capsys)
    assert f"is {name!r}, which is not inside the checkpoint's folder" in err
    assert opened == []
    with pytest.raises(loading.CheckpointError, match="not inside the checkpoint's folder"):
        loading.read_weights(model)
