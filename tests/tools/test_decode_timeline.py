"""tools/decode_timeline.py: kernels of graph replays assigned to layers and products, and the critical path."""

from __future__ import annotations

from tools.decode_timeline import assign, summarize

GRIDS = {896: "in_proj", 66: "x_proj", 787: "gate_up", 1001: "lm_head"}


def layer(t: float, splits: int = 9) -> list[dict]:
    """One layer's kernels as a replay records them (start, end in µs), its in_proj ending at t + 10."""
    k = lambda name, grid, start, end: {"name": name, "grid": grid, "start": t + start, "end": t + end}  # noqa: E731
    return [
        k("_gemv_kernel", (896, 1, 1), 0, 10),  # in_proj
        k("_attention_decode_kernel", (5, splits, 1), 7, 17),  # launched early (PDL), ends 7 after in_proj
        k("_causal_conv1d_update_kernel", (13, 1, 1), 10, 13),
        k("_gemv_kernel", (66, 1, 1), 11, 14.5),  # x_proj
        k("_ssm_update_kernel", (400, 1, 1), 12, 18),  # the later chain: ends 8 after in_proj
        k("_gemv_kernel", (200, 1, 1), 17, 25),  # out_proj: 7 after the chains
        k("_gemv_kernel", (787, 1, 1), 18.5, 38.5),  # gate/up: 13.5 after out_proj
        k("_gemv_kernel", (200, 1, 1), 36, 46.5),  # down: 8 after gate/up
    ]


def test_layers_are_assigned_and_the_critical_path_measured():
    kernels = layer(0) + layer(46) + layer(92, splits=13) + layer(138)
    kernels.append({"name": "_gemv_kernel", "grid": (1001, 1, 1), "start": 184, "end": 220})  # the LM head
    kernels.reverse()  # any order: sorted by start
    layers = assign(kernels, GRIDS)
    assert len(layers) == 4 and [x["global"] for x in layers] == [False, False, True, False]
    assert layers[0]["out_proj"]["end"] == 25 and layers[0]["down"]["end"] == 46.5
    summary = summarize(layers)
    assert summary["sliding"]["layers"] == 3 and summary["global"]["layers"] == 1
    row = summary["sliding"]
    assert row["attention end"] == 7 and row["ssm_update end"] == 8 and row["attention start"] == -3
    assert (row["path chains"], row["path out_proj"], row["path gate_up"], row["path down"]) == (8, 7, 13.5, 8)
    assert row["path in_proj"] == 46 + 10 - 46.5  # the next layer's in_proj ends 9.5 after this one's down


def test_a_layer_missing_a_kernel_is_left_out():
    kernels = layer(0)[:-1] + layer(46)
    layers = assign(kernels, GRIDS)
    assert len(layers) == 1 and layers[0]["in_proj"]["start"] == 46
