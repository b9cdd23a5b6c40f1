"""TransformerLens's own bridge tests, run on VisionBridge in place of every bridge they build.

``VisionBridge`` is meant to be a ``TransformerBridge`` to every TransformerLens tool. This script
checks that with TransformerLens's test suite: it fetches the sdist of the installed TransformerLens
version from PyPI (the sdist ships ``tests/``; the wheel does not), copies its tests, and runs the
selected ones twice with pytest, offline:

* unmodified (the reference), and
* with this file loaded as a pytest plugin: ``TransformerBridge.boot_transformers``,
  ``boot_native``, ``boot_tl_legacy`` and ``build_bridge_from_module`` then return the bridge turned
  into a ``VisionBridge`` (a tiny random convolutional encoder, an untrained projection, both made
  without touching the global RNG; the bridge's train/eval mode kept, since VisionBridge's own
  default is eval). A bridge VisionBridge refuses
  (no token embedding, an embedding without a row per vocabulary id) is returned unchanged and
  counted as "not converted".

It prints passed/failed/errors/skipped for both runs and every test that passes unmodified but not
on VisionBridge (the acceptance: none). Run with the repository root on ``PYTHONPATH``::

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/tl_bridge_suite.py            # the default selection
    PYTHONPATH=$PWD python scripts/tl_bridge_suite.py tests/unit/model_bridge -k state_dict

Tests that need the Hugging Face hub fail or skip alike in both runs (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

PLUGIN = Path(__file__).stem  # this module, loaded by the VisionBridge run with ``-p``
CONVERTED_LOG = "TL_BRIDGE_SUITE_LOG"  # env var: where the plugin records converted / refused bridges

# TransformerLens's tests of what the issue found broken on a wrapper (analysis tools, state dicts,
# str, train mode, parameters, hooks, generation) and the bridge's end-to-end tests.
DEFAULT_TESTS = [
    "tests/unit/tools/test_logit_lens.py",
    "tests/unit/tools/test_direct_logit_attribution.py",
    "tests/unit/tools/test_direct_logit_attribution_final_norm.py",
    "tests/unit/tools/test_jacobian_lens_import.py",
    "tests/unit/tools/test_model_state.py",
    "tests/unit/model_bridge/test_state_dict_round_trip.py",
    "tests/unit/model_bridge/test_state_dict_composition.py",
    "tests/unit/model_bridge/test_bridge_str.py",
    "tests/unit/model_bridge/test_bridge_train_mode_propagation.py",
    "tests/unit/model_bridge/test_optimizer_compatibility.py",
    "tests/unit/model_bridge/test_original_model_not_registered.py",
    "tests/unit/model_bridge/test_n_params_total.py",
    "tests/unit/model_bridge/test_end_to_end_bridge.py",
    "tests/unit/model_bridge/test_reset_hooks_registry.py",
    "tests/unit/model_bridge/test_caching_hooks_aliases.py",
    "tests/unit/model_bridge/test_bridge_generate_kv_cache.py",
    "tests/unit/model_bridge/test_loss_attention_mask.py",
    "tests/unit/model_bridge/test_boot_native.py",
    "tests/unit/test_patching.py",
]


# ---------------------------------------------------------------- the plugin (VisionBridge run only)
def _tiny_encoder():
    """A fresh encoder of one 8x8-stride convolution (2x2 patches of 8 features on 16x16 images), one per
    bridge so no two bridges share modules; its parameter names (``vision.model.conv.*``) collide
    with none that TransformerLens's tests look for."""
    from torch import nn

    from tl_multimodal.models.encoders import VisionEncoder

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)

        def forward_features(self, images):
            return self.conv(images)

    config = dict(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                  crop_pct=1.0, crop_mode="center")
    return VisionEncoder(TinyCNN(), name="suite_cnn", data_config=config)


def _to_vision_bridge(bridge):
    """``bridge`` as a VisionBridge in the bridge's train/eval mode, or unchanged if VisionBridge refuses it."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from tl_multimodal.models.bridge import VisionBridge

    if not isinstance(bridge, TransformerBridge) or isinstance(bridge, VisionBridge):
        return bridge
    training = bridge.training
    rng = torch.get_rng_state()  # the random encoder and projection leave the tests' RNG as it was
    try:
        model = VisionBridge(bridge, _tiny_encoder())
    except (TypeError, ValueError, AttributeError) as e:
        _record(f"refused {type(e).__name__}: {e}".replace("\n", " ")[:300])
        return bridge
    finally:
        torch.set_rng_state(rng)
    _record("converted")
    return model.train(training)


def _record(line: str) -> None:
    path = os.environ.get(CONVERTED_LOG)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _wrapped(constructor):
    def construct(*args, **kwargs):
        return _to_vision_bridge(constructor(*args, **kwargs))

    construct.__wrapped__ = constructor
    return construct


def pytest_configure(config) -> None:
    """Make every bridge constructor the tests use return a VisionBridge (wherever the tests import it from)."""
    import transformer_lens.model_bridge.sources as sources  # noqa: F401  (attaches boot_* to the class)
    from transformer_lens.model_bridge import TransformerBridge

    originals = {}
    for name in ("boot_transformers", "boot_native", "boot_tl_legacy"):
        if name in TransformerBridge.__dict__:
            fn = TransformerBridge.__dict__[name].__func__
            originals[fn] = _wrapped(fn)
            setattr(TransformerBridge, name, staticmethod(originals[fn]))
    builder = sources.build_bridge_from_module
    originals[builder] = _wrapped(builder)
    for module in list(sys.modules.values()):  # module-level names bound to the constructors
        if module is None or not getattr(module, "__name__", "").startswith("transformer_lens"):
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and value in originals:
                setattr(module, attr, originals[value])


# ---------------------------------------------------------------- the driver
def fetch_tests(version: str, workdir: Path) -> Path:
    """TransformerLens ``version``'s sdist from PyPI, unpacked; its ``tests/`` folder.

    Raises:
        SystemExit: The sdist ships no ``tests/`` folder.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sdist = workdir / f"transformer_lens-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"transformer-lens=={version}", "-d", str(workdir)], check=True)
    source = workdir / f"transformer_lens-{version}"
    if not source.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(workdir, filter="data")
    if not (source / "tests").is_dir():
        raise SystemExit(f"the sdist of transformer-lens {version} ships no tests/ folder")
    return source / "tests"


def run_pytest(tests_root: Path, targets: list[str], junit: Path, extra: list[str], vision: bool) -> None:
    """Run pytest on ``targets`` in the copied suite's root with the installed TransformerLens."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    here, repo = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])
    paths = [str(tests_root), repo] + ([here] if vision else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "--rootdir", str(tests_root), f"--junitxml={junit}", *(["-p", PLUGIN] if vision else []),
               *targets, *extra]
    subprocess.run(command, cwd=tests_root, env=env)


def outcomes(junit: Path) -> dict[str, str]:
    """``{test id: "passed" | "failed" | "error" | "skipped"}`` from a JUnit XML report."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[test] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                        else "skipped" if "skipped" in kinds else "passed")
    return result


def count(results: dict[str, str]) -> str:
    return ", ".join(f"{sum(v == k for v in results.values())} {k}" for k in ("passed", "failed", "error", "skipped"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help="test files/folders/node ids in the suite (default: a selection)")
    parser.add_argument("--version", default=None, help="TransformerLens version (default: the installed one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tl_bridge_suite"))
    parser.add_argument("-k", default=None, help="pytest -k expression")
    args = parser.parse_args()
    from importlib.metadata import version as installed

    version = args.version or installed("transformer-lens")
    tests = fetch_tests(version, args.workdir)
    root = args.workdir / f"run-{version}"
    if not root.exists():  # the tests only: TransformerLens itself is the installed one
        shutil.copytree(tests, root / "tests")
    targets = args.targets or [t for t in DEFAULT_TESTS if (root / t).exists()]
    extra = ["-k", args.k] if args.k else []
    log = root / "converted.log"
    log.unlink(missing_ok=True)
    os.environ[CONVERTED_LOG] = str(log)
    results = {}
    for name, vision in (("TransformerBridge", False), ("VisionBridge", True)):
        junit = root / f"{name}.xml"
        run_pytest(root, targets, junit, extra, vision)
        results[name] = outcomes(junit)
    plain, vision = results["TransformerBridge"], results["VisionBridge"]
    lines = log.read_text().splitlines() if log.exists() else []
    print(f"\ntransformer-lens {version}, {len(plain)} tests: {' '.join(targets)}")
    print(f"  TransformerBridge (unmodified): {count(plain)}")
    print(f"  VisionBridge in its place:      {count(vision)}")
    print(f"  bridges converted: {lines.count('converted')}, left plain (VisionBridge refused): "
          f"{len(lines) - lines.count('converted')}")
    for reason in sorted({line for line in lines if line != "converted"}):
        print(f"    {reason}")
    worse = sorted(t for t, r in plain.items() if r == "passed" and vision.get(t) != "passed")
    better = sorted(t for t, r in vision.items() if r == "passed" and plain.get(t) != "passed")
    print(f"  pass unmodified but not on VisionBridge: {len(worse)}")
    for t in worse:
        print(f"    {t} ({vision.get(t, 'missing')})")
    if better:
        print(f"  pass on VisionBridge only: {len(better)}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
