"""The two backends and their peers side by side on the offline model, in one run.

SmolLM2-135M + EfficientNet-Lite0 + the shipped projection; the bundled sample images embedded once
(the same soft prompts for every candidate); one thread, thread CPU time, candidates interleaved
(A B A B ...), medians (``_timing.py``). Prints:

* warm ``load("offline")`` (wall time; the converted-weights cache already written) per backend;
* caption: ``VisionBridge.generate`` (the lean loop), the bridge's own ``generate``
  (``use_lean_generation=False``), ``HookedVisionPrefix.generate`` (TransformerLens 3 only) and HF
  ``generate`` on ``inputs_embeds`` of a plain HF model with the same weights, ``--max-new-tokens``
  tokens each (no early stop), and whether all give the same tokens;
* attribute (captioning included, as ``tl_multimodal.attribute`` runs it) on each backend, against a
  plain HF forward+backward of the target logit on the finished sequence;
* attribution of every MLP unit at the image positions for one query (``attribute(..., probe=)``)
  against peers on the same HF weights and the same soft prompts: hooks on a plain HF model,
  TransformerLens's own ``run_with_cache(..., incl_bwd=True)`` on a plain ``TransformerBridge``
  (it needs a scalar output, so it differentiates ``return_type="loss"``: the same forward and backward
  work, another scalar) and nnsight (run where it is importable: ``--nnsight-python`` names a
  separate venv's Python; it is timed there, in its own process, on the same inputs saved to disk).

    python benchmarks/bench_backends.py [--images 2] [--max-new-tokens 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402

PROMPT = "A picture of"


def _hooked_available() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _load(backend: str):
    from tl_multimodal import load

    load("offline", backend=backend)  # writes the cache if it is missing
    t0 = time.perf_counter()
    model = load("offline", backend=backend)
    return model, time.perf_counter() - t0


def _plain_hf():
    """A plain HF SmolLM2 with the offline model's weights (the bridge backend's cached HF folder)."""
    from tl_multimodal.pretrained.offline import _hf_smollm2

    hf, tokenizer = _hf_smollm2(cache=True)
    return hf.eval(), tokenizer


def _gate_attribution(hf, x: torch.Tensor, slots: torch.Tensor, pred_pos: torch.Tensor, target: torch.Tensor):
    """Hooks on a plain HF Llama: grad x act of every MLP gate pre-activation (``hook_pre``) at the image
    slots, for the target logit at ``pred_pos``. ``[batch, layer, patch, unit]``."""
    acts = []
    handles = [layer.mlp.gate_proj.register_forward_hook(lambda m, i, o: acts.append(o))
               for layer in hf.model.layers]
    try:
        logits = hf(inputs_embeds=x).logits
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(x.shape[0])
    y = logits[rows, pred_pos, target]
    grads = torch.autograd.grad(y.sum(), acts)
    return torch.stack([(a * g)[slots].reshape(x.shape[0], -1, a.shape[-1]) for a, g in zip(acts, grads)], dim=1)


NNSIGHT_SCRIPT = r'''
import sys, time, statistics, torch
torch.set_num_threads(1)
from nnsight import LanguageModel
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, inputs, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = torch.load(inputs)
lm = LanguageModel(AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer=AutoTokenizer.from_pretrained(folder))
x, slots, pred_pos, target = d["x"], d["slots"], d["pred_pos"], d["target"]
rows = torch.arange(x.shape[0])
def run():
    out = {}  # written inside the trace (nnsight runs its body apart from this function's locals)
    with lm.trace(inputs_embeds=x):
        out["acts"] = acts = [layer.mlp.gate_proj.output.save() for layer in lm.model.layers]
        y = lm.lm_head.output[rows, pred_pos, target].sum()
        with y.backward():  # gradients arrive last layer first
            out["grads"] = [a.grad.save() for a in reversed(acts)][::-1]
    return torch.stack([(a * g)[slots].reshape(x.shape[0], -1, a.shape[-1])
                        for a, g in zip(out["acts"], out["grads"])], 1)
scores = run()
times = []
for _ in range(repeats):
    t0 = time.thread_time(); run(); times.append(time.thread_time() - t0)
print(f"{statistics.median(times)} {float((scores - d['scores']).abs().max() / d['scores'].abs().max())}")
'''


def _nnsight(python: str | None, x, slots, pred_pos, target, scores, repeats: int) -> str:
    """nnsight's time for the same attribution (in ``python``'s venv), or why it is not run."""
    if python is None:
        try:
            import nnsight  # noqa: F401
            python = sys.executable
        except ImportError:
            return "unavailable (not importable here; pass --nnsight-python of a venv that has it)"
    from tl_multimodal.pretrained.offline import smollm2_hf_cache_path

    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pt"
        torch.save({"x": x.detach(), "slots": slots, "pred_pos": pred_pos, "target": target, "scores": scores}, inputs)
        script = Path(tmp) / "nn.py"
        script.write_text(NNSIGHT_SCRIPT)
        run = subprocess.run([python, str(script), str(smollm2_hf_cache_path()), str(inputs), str(repeats)],
                             capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                                  "PATH": "/usr/bin:/bin"})
    if run.returncode != 0:
        return f"failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}"
    seconds, diff = run.stdout.split()[-2:]
    return f"{float(seconds):.2f} s (separate process, median of {repeats}; max relative difference {float(diff):.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="sample images (1-3)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nnsight-python", default=None, help="Python of a venv with nnsight and transformers 5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformer_lens.model_bridge import TransformerBridge

    from importlib.metadata import version

    from tl_multimodal import attribute
    from tl_multimodal.cli import _sample_images

    hooked_ok = _hooked_available()
    print(f"TransformerLens {version('transformer-lens')}, torch {torch.__version__}, 1 thread, "
          f"{args.images} images, {args.max_new_tokens} new tokens, median of {args.repeats} (thread CPU time)")
    models = {}
    for backend in ["bridge", "hooked"] if hooked_ok else ["bridge"]:
        models[backend], seconds = _load(backend)
        print(f"warm load('offline', backend={backend!r}): {seconds:.1f} s wall")
    if not hooked_ok:
        print("hooked backend: absent (HookedTransformer needs TransformerLens 3; this is "
              f"{version('transformer-lens')})")
    bridge = models["bridge"]
    images = list(_sample_images().values())[:args.images]
    with torch.no_grad():
        emb = bridge.embed_images(images)
    hf, tokenizer = _plain_hf()

    # ---- caption
    n = args.max_new_tokens
    tokens = bridge.to_tokens(PROMPT, image=True).expand(len(emb), -1)
    with torch.no_grad(), bridge._binding(("image_embed", emb)):
        x_prompt = bridge.embed(tokens)
    out = {}

    def gen(name, model, lean=True):
        def fn():
            model.use_lean_generation = lean
            with torch.no_grad():
                out[name] = model.generate(PROMPT, n, image_embed=emb, do_sample=False, stop_at_eos=False,
                                           return_type="tokens", verbose=False)[:, tokens.shape[1]:]
            model.use_lean_generation = True
        return fn

    hf.generation_config.eos_token_id = None  # no early stop, as stop_at_eos=False
    hf.generation_config.pad_token_id = tokenizer.eos_token_id

    def hf_generate():
        with torch.no_grad():
            out["hf_generate"] = hf.generate(inputs_embeds=x_prompt, attention_mask=torch.ones_like(tokens),
                                             do_sample=False, max_new_tokens=n)

    fns = {"bridge": gen("bridge", bridge), "bridge_own_generate": gen("bridge_own_generate", bridge, lean=False)}
    if hooked_ok:
        fns["hooked"] = gen("hooked", models["hooked"])
    fns["hf_generate"] = hf_generate
    times = interleaved(fns, repeats=args.repeats)
    same = [k for k, o in out.items() if torch.equal(out["bridge"], o.to(out["bridge"].device))]
    print("caption: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()) + f"; same tokens as bridge: {same}")
    ref = times.get("hooked", times["hf_generate"])
    print(f"  bridge / {'hooked' if hooked_ok else 'hf_generate'} = {times['bridge'] / ref:.2f}x")

    # ---- attribute, captioning included
    attrs = {}

    def attr(name, model):
        def fn():
            attrs[name] = attribute(model, image_embed=emb, max_new_tokens=n)
        return fn

    probe_ref = attribute(bridge, image_embed=emb, max_new_tokens=n).probe
    seq = probe_ref.tokens.to(bridge.cfg.device)
    with torch.no_grad(), bridge._binding(("image_embed", emb)):
        x_seq = bridge.embed(seq)
    slots, pred_pos, target = probe_ref.image_mask, probe_ref.pred_pos, probe_ref.target_ids
    fns = {"bridge": attr("bridge", bridge)}
    if hooked_ok:
        fns["hooked"] = attr("hooked", models["hooked"])
    fns["hf_forward_backward"] = lambda: _gate_attribution(hf, x_seq, slots, pred_pos, target)
    times = interleaved(fns, repeats=args.repeats)
    print("attribute (captioning included): " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    if hooked_ok:
        a, b = attrs["bridge"], attrs["hooked"]
        rel = float((a.scores - b.scores).abs().max() / b.scores.abs().max())
        print(f"  bridge / hooked = {times['bridge'] / times['hooked']:.2f}x; same targets: "
              f"{a.targets == b.targets}; max relative score difference {rel:.1e}")

    # ---- attribution of one query vs peers on the same weights and soft prompts
    plain_hf, plain_tok = _plain_hf()
    bos = plain_tok.bos_token
    plain_tok.bos_token = None  # as load_offline_bridge boots it (SmolLM2 adds no BOS)
    plain = TransformerBridge.boot_transformers("smollm2-135m", hf_model=plain_hf, tokenizer=plain_tok)
    plain_tok.bos_token = bos
    plain.eval()
    names = [f"blocks.{layer}.mlp.hook_pre" for layer in range(plain.cfg.n_layers)]
    labels = seq.masked_fill(bridge.image_mask(seq), 0)
    ours = {}

    def ours_fn(name, model):
        def fn():
            ours[name] = attribute(model, image_embed=emb, probe=probe_ref).scores
        return fn

    def tl_incl_bwd():
        _, cache = plain.run_with_cache(x_seq, return_type="loss", labels=labels, names_filter=names, incl_bwd=True)
        return [cache[n] * cache[n + "_grad"] for n in names]

    fns = {"bridge": ours_fn("bridge", bridge)}
    if hooked_ok:
        fns["hooked"] = ours_fn("hooked", models["hooked"])
    fns["hf_hooks"] = lambda: ours.__setitem__("hf_hooks", _gate_attribution(hf, x_seq, slots, pred_pos, target))
    fns["tl_run_with_cache_incl_bwd"] = tl_incl_bwd
    times = interleaved(fns, repeats=args.repeats)
    rel = float((ours["bridge"] - ours["hf_hooks"]).abs().max() / ours["hf_hooks"].abs().max())
    print("attribution of every MLP unit at the image positions: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
          + f"; bridge vs hf_hooks max relative difference {rel:.1e}")
    nn = _nnsight(args.nnsight_python, x_seq, slots, pred_pos, target, ours["hf_hooks"].detach(), args.repeats)
    print(f"  nnsight: {nn}")
    peers = min(v for k, v in times.items() if k not in ("bridge", "hooked"))
    print(f"  bridge / fastest peer in this process = {times['bridge'] / peers:.2f}x")


if __name__ == "__main__":
    main()
