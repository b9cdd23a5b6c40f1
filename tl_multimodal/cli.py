"""Command line: caption images with a frozen text-only LM, report an image's multimodal units,
attribute a dataset, or train the projection.

examples:
  tl-multimodal caption                         # bundled sample photos, offline SmolLM2 + EfficientNet-Lite0
  tl-multimodal caption photo.jpg photos/ "shots/*.png"   # files, folders and (quoted) globs
  tl-multimodal caption photo.jpg --model gpt2 --encoder beit_base_patch16_224 --projection p.pt
                                                # GPT-2 small + a timm BEiT from the hub (needs internet)
  tl-multimodal report photo.jpg -o report.html --k 10    # HTML report of the top multimodal units
  tl-multimodal attribute ../shared/data/coco_mini --split dev --out runs/attr   # dataset -> Parquet shards
  tl-multimodal atlas runs/attr -o site         # static website of the run's units and images
  tl-multimodal train ../shared/data/coco_mini --split train --out runs/p --steps 200 --batch-size 8
  tl-multimodal cache --clear                   # delete the converted-model cache

exit codes: 0 ok, 1 the command failed, 2 bad option, 3 bad input file, 4 bad output path,
5 the model could not be loaded, 130 interrupted, 141 the output pipe was closed (e.g. by head).
Errors are one line; `tl-multimodal --debug COMMAND ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tl_multimodal._cli_checks import (EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OUTPUT,
                                       EXIT_PIPE, EXIT_USAGE, CLIError, _check_file, _check_output, _device,
                                       _Formatter, _nonnegative_int, _Parser, _positive_float, _positive_int, _seed,
                                       _writable_folder, image_files)

# Nothing heavy (torch, TransformerLens, PIL) is imported at module level: `--help` and option errors
# must answer at once. Each command imports what it needs when it runs.

_HUB_ENCODER = "microsoft/beit-large-patch16-224-pt22k"  # models._hub.HUB_ENCODER (importing it imports torch)


# ------------------------------------------------------------------------------------- model
def _open_model(args, *, untrained: bool = False, quiet: bool = False):
    """``tl_multimodal.load`` with the command's ``--model``, ``--backend``, ``--projection``, ``--encoder``
    and ``--device``; one progress line to stderr first (unless ``quiet``), a failure as one line (exit 5).

    ``untrained``: without ``--projection``, an untrained projection where the model builds one (what
    training starts from) instead of the shipped one (``offline``) or the warning (LM hub name).
    """
    try:
        import torch

        from tl_multimodal.pretrained import offline as loading
        from tl_multimodal.pretrained.load import load, resolve_backend, spec_kind
    except ImportError as e:
        raise CLIError(f"cannot import the model code ({e})", EXIT_MODEL) from None
    device = getattr(args, "device", None)
    if device is not None:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise CLIError(f"--device {device} is not available here ({str(e).splitlines()[0]})", EXIT_USAGE) from None
    try:
        kind = spec_kind(args.model, encoder=args.encoder)
    except ValueError as e:
        raise CLIError(f"--model: {e}", EXIT_USAGE) from None
    projection = args.projection
    if projection is None and untrained and kind in ("offline", "lm"):
        projection = False
    where = f" on {device}" if device else ""
    if kind == "offline":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            cached = loading.is_cached(resolve_backend(args.backend, kind))
        except (ValueError, ImportError) as e:
            raise CLIError(f"--backend: {e}", EXIT_USAGE) from None
        note = ("from the cache" if cached else
                f"first run: converting the GGUF file takes about 2 min, then it is cached in {loading.cache_dir()}")
        line = f"Loading SmolLM2-135M + EfficientNet-Lite0{where} ({note}) ..."
    else:
        line = f"Loading {args.model}" + (f" + {args.encoder}" if args.encoder else "") + f"{where} ..."
    if not quiet:
        _progress(line)
    start = time.perf_counter()
    try:
        model = load(args.model, backend=args.backend, projection=projection, encoder=args.encoder,
                     device=device)
    except (ImportError, OSError, AttributeError, ValueError, TypeError) as e:
        raise CLIError(f"cannot load the model {args.model!r}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", EXIT_MODEL) from None
    if not quiet:
        _progress(f"Model loaded in {time.perf_counter() - start:.1f} s.")
    return model


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- commands
def _sample_images() -> dict[str, object]:
    """scikit-image's bundled photos (no download): a cat, a coffee cup, an astronaut."""
    from tl_multimodal.data.sources import SKIMAGE_PHOTOS, sample_images

    return {f"skimage.data.{name}": image for name, image in zip(SKIMAGE_PHOTOS, sample_images(3).images)}


def _caption(args) -> None:
    files = image_files(args.images) if args.images else None
    _check_file(args.projection, "--projection")
    model = _open_model(args)
    import torch

    images = {str(p): p for p in files} if files else _sample_images()
    torch.manual_seed(args.seed)
    captions = model.caption(list(images.values()), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=args.temperature, batch_size=args.batch_size)
    for name, caption in zip(images, captions):
        print(f"{name}: {args.prompt} {caption}")


def _report(args) -> None:
    if Path(args.image).is_dir():
        raise CLIError(f"{args.image} is a folder; report takes one image file", EXIT_INPUT)
    files = image_files([args.image])
    if len(files) != 1:
        raise CLIError(f"{args.image!r} matches {len(files)} images; report takes one", EXIT_INPUT)
    image = files[0]
    _check_output(args.out)
    _check_file(args.projection, "--projection")
    reference = None
    if args.reference is not None:
        from tl_multimodal.training.runner import load_rows

        try:
            reference = load_rows(args.reference)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--reference: {e}", EXIT_INPUT) from None
    model = _open_model(args)
    sae = None if args.sae is None else _open_sae(args.sae, model, "--sae")
    if reference is not None:
        _same_units(args.reference, sae)
    from tl_multimodal.models.images import to_pil
    from tl_multimodal.views.report import write_report

    out = write_report(model, to_pil(image, str(image)), args.out, n_units=args.k, prompt=args.prompt,
                       max_new_tokens=args.max_new_tokens, source=str(image.resolve()), reference=reference, sae=sae)
    print(out)


def _open_data(args):
    """``DATA`` and ``--split`` opened (exit 3 if missing or unreadable), with its first row (exit 3 if none)."""
    from tl_multimodal.data.sources import open_dataset, rows_naming_bad_images

    try:
        data = open_dataset(args.data, args.split)
        first = next(rows_naming_bad_images(data, data), None)  # a damaged first image is named
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise CLIError(f"{e}" if str(args.data) in str(e) else f"{args.data}: {e}", EXIT_INPUT) from None
    if first is None:
        raise CLIError(f"{args.data} has no rows" + (f" in split {args.split!r}" if args.split else ""), EXIT_INPUT)
    return data, first


def _attribute(args) -> None:
    """``tl-multimodal attribute``: DATA, --out and --projection checked, then the model loaded, then the run
    (an image that cannot be read stops it, naming the file: exit 3; the shards written so far are kept)."""
    from tl_multimodal.data.sources import IMAGE_KEYS, ImageReadError, find_column

    data, first = _open_data(args)
    try:
        find_column(first, IMAGE_KEYS, args.image_column, "--image-column")
        if args.id_column is not None:
            find_column(first, (), args.id_column, "--id-column")
    except ValueError as e:
        raise CLIError(f"{args.data}: {e}", EXIT_INPUT) from None
    _writable_folder(args.out, "--out")
    _check_file(args.projection, "--projection")
    from tl_multimodal.training._distributed import partial_state
    from tl_multimodal.training.runner import run_attribute  # torch, pyarrow: only when the command runs

    state = partial_state()
    args.device = str(state.device)  # each process on its own device, as accelerate assigns it
    model = _open_model(args, quiet=not state.is_main_process)
    try:
        run_attribute(args, data=data, model=model)
    except ImageReadError as e:
        raise CLIError(f"{args.data}: {e} (fix or remove it)", EXIT_INPUT) from e


def _atlas(args) -> None:
    """``tl-multimodal atlas``: the run's record read, its rows, data and model opened, then ``write_atlas``."""
    import json

    manifest = args.run_dir / "_run.json"
    if not args.run_dir.is_dir() or not manifest.is_file():
        raise CLIError(f"{args.run_dir} is not a run folder of `tl-multimodal attribute` (no _run.json)", EXIT_INPUT)
    record = json.loads(manifest.read_text())
    data = record.get("data") or {"source": record.get("data_source"), "split": record.get("split")}
    source = args.data or data.get("source")
    split = args.split if args.split is not None else data.get("split")
    if not source:
        raise CLIError(f"{manifest} records no data source; pass --data", EXIT_INPUT)
    _writable_folder(args.out, "--out")
    from tl_multimodal.data.sources import ImagesByIndex, open_dataset
    from tl_multimodal.training.runner import load_rows

    try:
        rows = load_rows(args.run_dir)
        dataset = open_dataset(source, split)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e), EXIT_INPUT) from None
    try:
        images = ImagesByIndex(dataset, sorted(set(rows["image_index"].tolist())), record.get("image_column"))
    except ValueError as e:
        raise CLIError(f"{source}: {e} (another --data or --split?)", EXIT_INPUT) from None
    args.model = args.model or record.get("model_spec") or "offline"
    if args.projection is None and record.get("projection_file"):
        args.projection = Path(record["projection_file"])
    _check_file(args.projection, "--projection")
    model = _open_model(args)
    from tl_multimodal.models.projection import projection_id
    from tl_multimodal.views.atlas import write_atlas

    pid = projection_id(model.projection)
    if record.get("projection_id") not in (None, pid):
        raise CLIError(f"the model's projection ({pid}) is not the run's ({record['projection_id']}); pass the "
                       "run's --model and --projection", EXIT_MODEL)
    sae = _run_sae(args, record, model)
    provenance = {"run": str(args.run_dir.resolve()), "model": args.model, "lm": record.get("lm"),
                  "encoder": record.get("encoder"), "projection": pid, "data": source, "split": split}
    atlas = write_atlas(model, rows, images, args.out, provenance=provenance, units_per_page=args.units_per_page,
                        images_per_unit=args.images_per_unit, units_per_image=args.units_per_image,
                        batch_size=args.batch_size, progress=not args.no_progress, sae=sae)
    print(atlas)
    print(args.out / "index.html")


def _open_sae(where: str, model, what: str):
    """``load_sae(where)`` in the model's dtype and on its device, as the runner loads it; a failure as one
    line naming ``what`` (exit 3)."""
    from tl_multimodal.sae.load import load_sae

    try:
        return load_sae(where, dtype=model.cfg.dtype, device=model.cfg.device)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise CLIError(f"{what}: {e}", EXIT_INPUT) from None


def _same_units(run: Path, sae) -> None:
    """Refuse a ``--reference`` run whose units are not the report's: MLP units against an SAE's latents,
    or another SAE (by its id, where the run recorded one)."""
    import json

    from tl_multimodal.sae.model import sae_id

    manifest = run / "_run.json"
    record = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if (record.get("sae") is None) != (sae is None):
        raise CLIError(f"--reference: {run} is a run of {'MLP units' if record.get('sae') is None else 'SAE latents'}"
                       f", but the report shows {'MLP units' if sae is None else 'latents (--sae)'}", EXIT_USAGE)
    if sae is not None and record.get("sae_id") not in (None, sae_id(sae)):
        raise CLIError(f"--reference: {run} was made with another SAE (id {record['sae_id']}, --sae's is "
                       f"{sae_id(sae)})", EXIT_USAGE)


def _run_sae(args, record: dict, model):
    """The SAE of the run (None for a run of MLP units): the one ``_run.json`` records, or ``--sae`` (a moved
    copy), loaded as the runner loaded it (the model's dtype and device); refused when it is not the run's."""
    if record.get("sae") is None:
        if args.sae is not None:
            raise CLIError(f"--sae: {args.run_dir} is a run of MLP units, not of an SAE's latents", EXIT_USAGE)
        return None
    from tl_multimodal.sae.model import sae_id

    where = record["sae"] if args.sae is None else args.sae
    sae = _open_sae(where, model, "--sae" if args.sae is not None else "the run's SAE (moved? pass it as --sae)")
    sid = sae_id(sae)
    if record.get("sae_id") not in (None, sid):
        raise CLIError(f"--sae: the SAE at {where} (id {sid}) is not the run's (id {record['sae_id']})", EXIT_INPUT)
    return sae


def _train(args) -> None:
    """``tl-multimodal train``: every input checked, then the model loaded, then ``train_projection``."""
    from tl_multimodal.data.sources import CAPTION_KEYS, IMAGE_KEYS, ImageReadError, find_column

    data, first = _open_data(args)
    import datasets

    stream = not isinstance(data, datasets.Dataset)
    try:
        image_column = find_column(first, IMAGE_KEYS, args.image_column, "--image-column")
        caption_column = find_column(first, CAPTION_KEYS, args.caption_column, "--caption-column")
    except ValueError as e:
        raise CLIError(f"{args.data}: {e}", EXIT_INPUT) from None
    _writable_folder(args.out, "--out")
    state = args.out / "training_state.pt"
    if args.resume and not state.is_file():
        raise CLIError(f"--resume: {state} does not exist (nothing to resume)", EXIT_INPUT)
    if not args.resume and state.exists():
        raise CLIError(f"--out {args.out} holds a training state; add --resume to continue it, or pick another --out",
                       EXIT_OUTPUT)
    if args.feature_cache is not None:
        if stream:
            raise CLIError("--feature-cache needs a folder DATA (rows by index); a stream is encoded as it is read",
                           EXIT_USAGE)
        _writable_folder(args.feature_cache, "--feature-cache")
    _check_file(args.projection, "--projection")
    import torch

    from tl_multimodal.training._distributed import rank_and_world_size
    from tl_multimodal.training.train import train_projection

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, _ = rank_and_world_size()
    model = _open_model(args, untrained=True, quiet=rank != 0)
    cache = None
    if args.feature_cache is not None:
        name = f"{Path(args.data).resolve().name}-{args.split or 'all'}-{model.vision.model_name.replace('/', '_')}"
        cache = args.feature_cache / f"{name}.npy"
    try:
        result = train_projection(model, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  warmup=args.warmup, grad_accum=args.grad_accum, checkpoint_dir=args.out,
                                  checkpoint_every=args.checkpoint_every, resume_from=args.out if args.resume else None,
                                  feature_cache=cache, image_column=image_column, caption_column=caption_column,
                                  device=args.device, seed=args.seed, progress=not args.no_progress,
                                  dataset_name=f"{args.data}" + (f" ({args.split})" if args.split else ""))
    except ImageReadError as e:
        raise CLIError(f"{args.data}: {e} (fix or remove it)", EXIT_INPUT) from e
    if rank == 0:
        from tl_multimodal.models.projection import projection_id

        print(f"{result}; projection saved to {args.out / 'projection.pt'} (id {projection_id(model.projection)})",
              flush=True)


def _cache(args) -> None:
    from tl_multimodal.pretrained import offline as loading  # torch only, no model

    root = loading.cache_dir()
    if args.clear:
        freed = loading.clear_cache()
        print(f"deleted {root} ({freed / 1e6:.0f} MB)" if freed else f"no cache at {root}")
        return
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    print(f"{root} ({size / 1e6:.0f} MB)" if size else f"{root} (empty)")


# ------------------------------------------------------------------------------------- parser
def _load_options(parser: argparse.ArgumentParser, projection_help: str) -> None:
    """--model, --backend, --encoder, --projection: what ``tl_multimodal.load`` takes, for every command."""
    parser.add_argument("--model", default="offline", metavar="SPEC",
                        help="'offline' (SmolLM2 + EfficientNet-Lite0, no internet), 'limber:CONFIG' (with "
                             "--projection), an LM hub name (with --encoder), a LLaVA hub name, or "
                             "module:function / file.py:function (default: offline)")
    parser.add_argument("--backend", default="auto", choices=("auto", "hooked", "bridge"),
                        help="hooked: HookedTransformer (TransformerLens 3); bridge: TransformerBridge; "
                             "auto: hooked where TransformerLens has it (default: auto)")
    parser.add_argument("--encoder", default=None,
                        help="with an LM hub name as --model (needed there): its vision encoder, a HF (name with "
                             f"'/') or timm model name, e.g. LiMBeR's {_HUB_ENCODER}")
    parser.add_argument("--projection", type=Path, default=None, metavar="FILE", help=projection_help)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="A picture of", help="text after the image tokens")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N",
                        help="most tokens generated per caption")
    parser.add_argument("--device", type=_device, default="cpu", help="where the model runs: cpu, cuda, cuda:N, mps")
    _load_options(parser, "projection checkpoint (default: the shipped one with offline; the model's own "
                          "with a LLaVA or a factory; an untrained one, with a warning, with an LM hub name)")


def build_parser() -> argparse.ArgumentParser:
    """The ``tl-multimodal`` parser; a new command is one more ``sub.add_parser`` with ``run=``."""
    parser = _Parser(prog="tl-multimodal", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cap = sub.add_parser("caption", help="caption images", formatter_class=_Formatter,
                         description="Caption images: the text the LM writes after the image tokens and --prompt.")
    cap.add_argument("images", nargs="*", metavar="IMAGE",
                     help="image files, folders of images or quoted glob patterns "
                          "(default: three scikit-image sample photos)")
    _model_options(cap)
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cap.add_argument("--temperature", type=_positive_float, default=1.0, help="with --sample: softmax temperature")
    cap.add_argument("--seed", type=_seed, default=0, help="random seed (for --sample)")
    cap.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per generation batch")
    cap.set_defaults(run=_caption)

    rep = sub.add_parser("report", help="write an HTML report of an image's top multimodal units",
                         formatter_class=_Formatter,
                         description="Write a self-contained HTML report: the image, its caption, and the top\n"
                                     "units by attribution with their decoded tokens and heatmaps.")
    rep.add_argument("image", metavar="IMAGE", help="one image file")
    rep.add_argument("-o", "--out", type=Path, default=Path("report.html"), metavar="FILE",
                     help="the HTML file to write (missing folders are created)")
    rep.add_argument("--k", type=_positive_int, default=10, help="top units shown")
    rep.add_argument("--reference", type=Path, default=None, metavar="RUN",
                     help="an `attribute` run: mark the units that are top units for many of its images")
    rep.add_argument("--sae", default=None, metavar="PATH",
                     help="show this SAE's top latents instead of MLP units (a SAELens folder, a params.npz, "
                          "owner/repo/folder, or 'offline': the SAE shipped for the offline model)")
    _model_options(rep)
    rep.set_defaults(run=_report)

    att = sub.add_parser("attribute", help="attribute every image of a dataset into Parquet shards",
                         formatter_class=_Formatter,
                         description="Caption each image, take the first noun as target, attribute it to every MLP\n"
                                     "unit at every image patch, and write each image's top units to resumable\n"
                                     "Parquet shards in --out. Under `accelerate launch` each process takes its\n"
                                     "share of the shards.")
    att.add_argument("data", metavar="DATA", help="a coco_mini-style folder, webdataset .tar shards, or a hub dataset name")
    att.add_argument("--split", default=None, help="split of the dataset (e.g. train, dev)")
    att.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="only the first N images")
    att.add_argument("-o", "--out", type=Path, required=True, metavar="DIR",
                     help="output folder of Parquet shards (a rerun skips finished shards)")
    att.add_argument("--restart", action="store_true",
                     help="delete the run in --out (its shards and _run.json) and start over; without it a rerun "
                          "resumes, and one with other data or settings is refused")
    att.add_argument("--k", type=_positive_int, default=100, help="top units kept per image")
    att.add_argument("--shard-size", type=_positive_int, default=64, metavar="N", help="images per shard")
    att.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="images per forward/backward pass")
    att.add_argument("--prompt", default="A picture of", help="text after the image tokens")
    att.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N", help="caption length")
    att.add_argument("--hook", default="pre", choices=("pre", "post", "pre_linear"), help="MLP activation attributed")
    att.add_argument("--sae", default=None, metavar="PATH",
                     help="attribute this SAE's latents instead (a SAELens folder, a params.npz or owner/repo/folder)")
    att.add_argument("--image-column", default=None, help="the image column (default: found by name)")
    att.add_argument("--id-column", default=None, help="the image id column (default: found by name)")
    _load_options(att, "projection checkpoint (default: as for caption)")
    att.add_argument("--no-progress", action="store_true", help="no progress bar")
    att.set_defaults(run=_attribute, distributed=True)

    at = sub.add_parser("atlas", help="write a static website of a run's units and images", formatter_class=_Formatter,
                        description="Write a static website (open SITE/index.html from disk, no server, no network)\n"
                                    "of an `attribute` run: an index of its units, a page per unit (decoded tokens,\n"
                                    "targets, activation histogram, top images with heatmaps) and per image.\n"
                                    "The images and the model are the ones the run recorded in RUN/_run.json;\n"
                                    "for a run made with --sae, the units are that SAE's latents (latents/ pages).")
    at.add_argument("run_dir", type=Path, metavar="RUN", help="the output folder of `tl-multimodal attribute`")
    at.add_argument("-o", "--out", type=Path, required=True, metavar="SITE", help="the site's folder")
    at.add_argument("--data", default=None, help="the run's DATA (default: the one it recorded)")
    at.add_argument("--split", default=None, help="the run's --split (default: the one it recorded)")
    at.add_argument("--units-per-page", type=_positive_int, default=200, metavar="N", help="rows of each index page")
    at.add_argument("--images-per-unit", type=_positive_int, default=12, metavar="N",
                    help="top images (with heatmaps) on a unit's page")
    at.add_argument("--units-per-image", type=_positive_int, default=10, metavar="N",
                    help="top units (with heatmaps) on an image's page")
    at.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="images per forward pass")
    at.add_argument("--device", type=_device, default="cpu", help="where the model runs: cpu, cuda, cuda:N, mps")
    _load_options(at, "projection checkpoint (default: the run's)")
    at.add_argument("--sae", default=None, metavar="PATH",
                    help="for a run made with --sae: its SAE, moved (default: the one the run recorded; another "
                         "SAE is refused)")
    at.set_defaults(model=None)
    at.add_argument("--no-progress", action="store_true", help="no progress bar")
    at.set_defaults(run=_atlas)

    tr = sub.add_parser("train", help="train the projection on image-caption pairs", formatter_class=_Formatter,
                        description="Train the projection (the LM and the encoder stay frozen) on a folder in the\n"
                                    "coco_mini layout (features encoded once), webdataset shards or a hub dataset\n"
                                    "(both streamed: read in order, never held whole). --out gets projection.pt,\n"
                                    "projection_stepN.pt and training_state.pt; --resume continues from it.\n"
                                    "Under `accelerate launch` the processes share each batch.")
    tr.add_argument("data", metavar="DATA", help="a coco_mini-style folder, webdataset .tar shards, or a hub dataset name")
    tr.add_argument("--split", default=None, help="split of the dataset (e.g. train)")
    tr.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="folder for checkpoints and state")
    tr.add_argument("--steps", type=_positive_int, default=15_000, help="optimizer steps")
    tr.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="rows per step (all processes)")
    tr.add_argument("--lr", type=_positive_float, default=8e-4, help="AdamW learning rate")
    tr.add_argument("--warmup", type=_nonnegative_int, default=100, metavar="N", help="linear warmup steps")
    tr.add_argument("--grad-accum", type=_positive_int, default=1, metavar="N", help="micro-batches per step")
    tr.add_argument("--checkpoint-every", type=_positive_int, default=1000, metavar="N", help="steps between checkpoints")
    tr.add_argument("--feature-cache", type=Path, default=None, metavar="DIR",
                    help="folder for memory-mapped encoder features, written once and reused (folder DATA only)")
    tr.add_argument("--resume", action="store_true", help="continue from --out's training_state.pt")
    tr.add_argument("--device", type=_device, default=None,
                    help="where to train (default: cuda when present, one GPU per process, else cpu)")
    tr.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch CPU threads")
    tr.add_argument("--seed", type=_seed, default=0, help="seeds caption sampling, batch order and dropout")
    tr.add_argument("--image-column", default=None, help="the image column (default: found by name)")
    tr.add_argument("--caption-column", default=None, help="the caption column (default: captions, caption, txt, text)")
    _load_options(tr, "projection checkpoint to start from (default: an untrained one; a LLaVA's or a "
                      "factory's own)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(run=_train, distributed=True)

    cache = sub.add_parser("cache", help="show or clear the converted-model cache", formatter_class=_Formatter,
                           description="The offline model is converted once and cached (in $TL_MULTIMODAL_CACHE,\n"
                                       "$XDG_CACHE_HOME/tl_multimodal or ~/.cache/tl_multimodal).\n"
                                       "Show the cache folder and its size, or delete it.")
    cache.add_argument("--clear", action="store_true", help="delete the cache")
    cache.set_defaults(run=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tl-multimodal``; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # `--help | head -1`
        return _closed_pipe()
    prog = f"tl-multimodal {args.command}"
    if getattr(args, "distributed", False):  # `accelerate launch --cpu --num_processes N`: start the N processes
        from tl_multimodal.training._distributed import relaunch_cpu_processes

        try:
            code = relaunch_cpu_processes("tl_multimodal", argv)
        except RuntimeError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if code is not None:
            return code
    try:
        args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except (CLIError, ValueError, TypeError) as e:  # the library names bad input with ValueError/TypeError
        if args.debug:
            e.__suppress_context__ = False  # the error a CLIError replaced, too
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code if isinstance(e, CLIError) else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `tl-multimodal caption | head -1`
        return _closed_pipe()
    return 0


def _closed_pipe() -> int:
    """Stop quietly when stdout's reader has gone: later writes (the interpreter's last flush) go nowhere."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
