"""CPU checks of the ModulatedConv2d TensorRT plugin library (no GPU, no TensorRT runtime): the C++ harness loads
the library like IPluginRegistry::loadLibrary and exercises creator, fields, serialisation, shapes, formats,
workspace and clone; against the CPU-emulation build of the same library it also runs enqueue() numerically."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The checks the harness must report (a renamed or dropped check fails here, not silently).
REQUIRED_CHECKS = {
    "dlopen", "entry_points_exported", "one_creator", "creator_interface_v3one", "creator_name", "creator_version",
    "creator_namespace", "creator_field_names", "create_all_fields", "capabilities", "capability_kinds",
    "plugin_identity", "fields_parsed", "serialisation_round_trip", "clone", "attach_to_context", "create_to_rgb",
    "unused_filter_not_serialised", "parse_int64_float64_fields", "parse_defaults", "reject_up_3", "reject_act_5",
    "reject_has_noise_2", "reject_up2_without_filter", "reject_filter_length_mismatch", "reject_filter_too_large",
    "reject_non_integer_up", "reject_nan_gain", "reject_char_field", "reject_null_fields", "output_shape_up1",
    "output_shape_up2", "output_shape_to_rgb", "output_shape_symbolic_height", "nb_outputs", "output_data_types",
    "format_fp32_linear", "format_fp16_linear", "format_reject_int8", "format_reject_bf16",
    "format_reject_mixed_types", "format_reject_non_linear", "workspace_size_max_batch", "configure_dynamic_batch",
    "configure_reject_channel_mismatch", "configure_reject_input_count", "configure_reject_noise_size",
    "on_shape_change", "on_shape_change_reject_batch", "timing_cache_id",
}
ENQUEUE_CHECKS = {
    f"enqueue_{name}_{dtype}"
    for name in ("up1_noise_bias_lrelu", "up2_clamp_per_sample_noise", "up1_plain", "to_rgb_skip_clamp")
    for dtype in ("fp32", "fp16")
}


def _run_harness(harness: str, library: str, *flags: str) -> tuple[set[str], list[str], str]:
    proc = subprocess.run([harness, library, *flags], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    passed = {line[5:] for line in lines if line.startswith("PASS ")}
    failed = [line for line in lines if line.startswith("FAIL ")]
    assert lines and lines[-1].endswith("failed"), f"harness did not finish:\n{proc.stdout}\n{proc.stderr}"
    assert (proc.returncode == 0) == (not failed), proc.stdout
    return passed, failed, proc.stdout


def test_harness_on_cuda_plugin_library(plugin_build):
    """The real (nvcc-built) library: everything short of enqueue, which needs a GPU."""
    if "plugin" not in plugin_build:
        pytest.skip("nvcc not found: the CUDA plugin library was not built (CPU targets only)")
    passed, failed, out = _run_harness(plugin_build["harness"], plugin_build["plugin"])
    assert not failed, "\n".join(failed)
    assert REQUIRED_CHECKS <= passed, f"missing checks: {sorted(REQUIRED_CHECKS - passed)}"


def test_harness_on_emulated_plugin_library_with_enqueue(plugin_build):
    """The same plugin source with CPU-emulated kernels: enqueue() vs a float64 textbook implementation."""
    passed, failed, out = _run_harness(plugin_build["harness"], plugin_build["plugin_emulated"], "--enqueue")
    assert not failed, "\n".join(failed)
    assert (REQUIRED_CHECKS | ENQUEUE_CHECKS) <= passed, \
        f"missing checks: {sorted((REQUIRED_CHECKS | ENQUEUE_CHECKS) - passed)}"


def test_plugin_library_exports_only_entry_points(plugin_build):
    """Hidden visibility: the registry entry points are exported, the implementation is not."""
    if "plugin" not in plugin_build:
        pytest.skip("nvcc not found: the CUDA plugin library was not built")
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    out = subprocess.run(["nm", "-D", "--defined-only", plugin_build["plugin"]], capture_output=True, text=True,
                         check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.split() and line.split()[-2] in ("T", "W")}
    assert {"getCreators", "setLoggerFinder"} <= names
    assert not [n for n in names if "ModulatedConv2dPlugin" in n], "C++ symbols leak from the plugin library"


def test_build_cli_rejects_bad_arch_list():
    proc = subprocess.run([sys.executable, "-m", "trt_plugins.build", "--cuda-archs", "sm_90", "--build-dir",
                           str(ROOT / "trt_plugins" / "build" / "bad-args")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "--cuda-archs must look like" in proc.stderr
    assert "Traceback" not in proc.stderr
