"""`stylecast export onnx|engine|bundle|verify`: ONNX graphs, TensorRT engines and verified serving bundles; `verify`
imports only the torch-free serving package."""

from __future__ import annotations

import sys
from pathlib import Path

import click

CTX = {"show_default": True}


@click.command("onnx", context_settings=CTX)
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Native checkpoint directory, rosinality .pt or NVlabs .pkl.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory for graphs.")
@click.option("--graph", "graphs", multiple=True, type=click.Choice(["mapping", "synthesis", "generator"]),
              default=("mapping", "synthesis"), help="Graphs to write (repeatable).")
@click.option("--output", "outputs", multiple=True, type=click.Choice(["img", "img_u8"]),
              default=("img", "img_u8"), help="Synthesis outputs: float [-1,1] NCHW and/or uint8 NHWC.")
@click.option("--fp16/--fp32", default=False, help="Half precision (fp32 demodulation, activations clamped).")
@click.option("--noise-input/--const-noise", default=False, help="Expose per-layer noise as graph inputs.")
@click.option("--opset", type=click.IntRange(17, 23), default=17)
@click.option("--simplify/--no-simplify", default=False, help="Run onnxsim when installed.")
@click.option("--modconv", type=click.Choice(["ref", "plugin"]), default="ref",
              help="'plugin' emits stylecast::ModulatedConv2d nodes for the TensorRT plugin.")
def onnx_cmd(checkpoint: Path, out: Path, graphs: tuple[str, ...], outputs: tuple[str, ...], fp16: bool,
             noise_input: bool, opset: int, simplify: bool, modconv: str) -> None:
    """Export ONNX graphs of a generator (dynamic batch axis).

    \b
    Example:
      stylecast export onnx --checkpoint ffhq.pt --out onnx/ --graph mapping --graph synthesis
    """
    from export.onnx_export import export_generator, export_mapping, export_synthesis
    from training.checkpoints import load_checkpoint

    G = load_checkpoint(checkpoint).G
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_fp16" if fp16 else ""
    for g in graphs:
        path = out / f"{g}{suffix}.onnx"
        if g == "mapping":
            info = export_mapping(G, path, opset=opset)
        elif g == "synthesis":
            if modconv == "plugin":
                from export.plugin_graph import export_synthesis_plugin
                info = export_synthesis_plugin(G, path, outputs=outputs, fp16=fp16, opset=opset)
            else:
                info = export_synthesis(G, path, outputs=outputs, noise_input=noise_input, fp16=fp16, opset=opset,
                                        do_simplify=simplify)
        else:
            info = export_generator(G, path, fp16=fp16, opset=opset)
        click.echo(f"{path}: {info.nodes} nodes, {info.bytes / 2**20:.2f} MiB, "
                   f"inputs {list(info.inputs)}, outputs {list(info.outputs)}")


@click.command("engine", context_settings=CTX)
@click.option("--onnx", "onnx_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="synthesis.onnx to build from.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16")
@click.option("--min-batch", type=click.IntRange(1), default=1)
@click.option("--opt-batch", type=click.IntRange(1), default=4)
@click.option("--max-batch", type=click.IntRange(1), default=16)
@click.option("--plugin-library", type=click.Path(exists=True, path_type=Path), default=None,
              help="libstylecast_trt_plugins.so for graphs with stylecast::ModulatedConv2d nodes.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="Timing cache file.")
@click.option("--compute-capability", default=None,
              help="Target compute capability for ahead-of-time builds without a GPU (e.g. 9.0).")
def engine_cmd(onnx_path: Path, out: Path, precision: str, min_batch: int, opt_batch: int, max_batch: int,
               plugin_library: Path | None, timing_cache: Path | None, compute_capability: str | None) -> None:
    """Build a TensorRT engine (tensorrt, else tensorrt_rtx) from a synthesis graph.

    \b
    Example:
      stylecast export engine --onnx bundle/synthesis.onnx --out engines/ --precision fp16 --max-batch 16
    """
    from export.engine import build_engine

    if not min_batch <= opt_batch <= max_batch:
        raise ValueError("batch profile must satisfy min <= opt <= max")
    out.mkdir(parents=True, exist_ok=True)
    info = build_engine(onnx_path, out, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
                        max_batch=max_batch, plugin_library=plugin_library, timing_cache=timing_cache,
                        compute_capability=compute_capability)
    click.echo(f"wrote {out / info['file']} ({info['trt_flavour']} {info['trt_version']}, "
               f"sm {info['compute_capability']}, {precision})")


@click.command("bundle", context_settings=CTX)
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Native checkpoint directory, rosinality .pt or NVlabs .pkl.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (must not exist: bundles are immutable).")
@click.option("--name", default=None, help="Model name served (default: from the checkpoint file name).")
@click.option("--default-psi", type=float, default=0.7, help="Truncation used when a request gives none.")
@click.option("--fp16/--no-fp16", default=False, help="Also write synthesis_fp16.onnx.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["fp32", "fp16"]),
              help="Also build TensorRT engines of these precisions (needs tensorrt or tensorrt_rtx).")
@click.option("--simplify/--no-simplify", default=False, help="Run onnxsim when installed.")
@click.option("--verify/--no-verify", default=True, help="Run `export verify` on the result.")
@click.option("--encoder", type=click.Path(path_type=Path), default=None,
              help="pSp / e4e encoder (official .pt or stylecast dir) for this generator: adds encoder.onnx so "
                   "the server can Stylize face photos.")
@click.option("--encoder-space", type=click.Choice(["w+", "z+"]), default=None,
              help="Latent space of --encoder when its checkpoint does not record it (DualStyleGAN's encoder.pt: z+).")
@click.option("--latent-space", default=None,
              help="Id of the W+ space this synthesis accepts (default with --encoder: the bundle name).")
@click.option("--encoder-from", type=click.Path(path_type=Path), default=None,
              help="A bundle with an encoder whose latent space this adapted model (NADA, blended, finetuned "
                   "from that base) shares; the server then stylizes photos with that bundle's encoder.")
def bundle_cmd(checkpoint: Path, out: Path, name: str | None, default_psi: float, fp16: bool,
               engines: tuple[str, ...], simplify: bool, verify: bool, encoder: Path | None,
               encoder_space: str | None, latent_space: str | None, encoder_from: Path | None) -> None:
    """Build an immutable serving bundle: manifest, mapping/synthesis ONNX, golden outputs (+ encoder.onnx).

    \b
    Examples:
      stylecast export bundle --checkpoint ffhq.pt --out models/ffhq --name ffhq --encoder psp_ffhq_encode.pt
      stylecast export bundle --checkpoint pixar.pt --out models/pixar --encoder-from models/ffhq
    """
    from export.bundle import BundleOptions, build_bundle

    opts = BundleOptions(name=name, default_psi=default_psi, fp16=fp16, engines=list(engines), simplify=simplify,
                         encoder=encoder, encoder_space=encoder_space, latent_space=latent_space,
                         encoder_from=encoder_from)
    path = build_bundle(checkpoint, out, opts, progress=sys.stderr.isatty())
    click.echo(f"wrote bundle {path}")
    if verify:
        verify_and_report(path)


@click.command("verify", context_settings=CTX)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--provider", "providers", multiple=True, default=("CPUExecutionProvider",),
              help="ONNX Runtime execution providers of the graph checks, in order (repeatable); one this "
                   "onnxruntime lacks makes the result NOT VERIFIED.")
@click.option("--engines", type=click.Choice(["auto", "require", "only", "skip"]), default="auto",
              help="TensorRT engines: auto = check those that can run here and list the others as not checked; "
                   "require = every engine must be checked here; only = engines only, as require; skip = none.")
def verify_cmd(bundle: Path, providers: tuple[str, ...], engines: str) -> None:
    """Check a bundle's manifest and files and run its graphs against golden.npz, with the server's own golden
    checks (torch-free).

    Exit status: 0 verified (every check ran here and passed), 1 FAILED (invalid bundle or a check outside its
    tolerance), 3 NOT VERIFIED (nothing failed, but what was asked for could not be checked here: a missing
    execution provider, or with --engines require/only an engine without its GPU / TensorRT here).

    \b
    Examples:
      stylecast export verify models/ffhq
      stylecast export verify models/ffhq --engines only --provider CUDAExecutionProvider
    """
    verify_and_report(bundle, list(providers), engines)


def verify_and_report(bundle: Path, providers: list[str] | None = None, engines: str = "auto") -> None:
    """Run serving.verify on a bundle, print every check and the outcome; exit with its status unless verified."""
    from serving.verify import verify_bundle

    report = verify_bundle(bundle, providers=providers, engines=engines)
    for p in report.problems:
        click.echo(f"FAIL {p}", err=True)
    for c in report.checks:
        status = "skip" if c.skipped else ("ok  " if c.ok else "FAIL")
        psnr = "inf" if c.psnr == float("inf") else f"{c.psnr:.1f}"
        click.echo(f"{status} {c.graph:16s} {c.output:9s} max_abs={c.max_abs:.3g} psnr={psnr} dB {c.note}")
    for u in report.unverified:
        click.echo(f"not checked: {u}", err=True)
    click.echo(report.summary())
    if report.exit_code:
        raise SystemExit(report.exit_code)
