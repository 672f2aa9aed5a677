"""`stylecast client list|info|styles|generate|stream|stylize`: call a running `stylecast serve` from the command
line."""

from __future__ import annotations

from pathlib import Path

import click

CTX = {"show_default": True}


def _store_load_balancing(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    ctx.meta["stylecast.load_balancing"] = value.replace("-", "_")
    return value


def _conn_options(f):
    f = click.option("--load-balancing", type=click.Choice(["pick-first", "round-robin"]), default="pick-first",
                     expose_value=False, callback=_store_load_balancing,
                     help="round-robin: spread calls over every replica of --server (a list or a DNS name), with "
                          "health checking and UNAVAILABLE retried on another replica. "
                          "Example: --server 127.0.0.1:50051,127.0.0.1:50052 --load-balancing round-robin")(f)
    f = click.option("--timeout", type=click.FloatRange(0.001, 3600), default=60.0, help="Deadline in seconds.")(f)
    f = click.option("--tls-ca", type=click.Path(path_type=Path), default=None,
                     help="PEM CA certificate: connect with TLS and trust this CA.")(f)
    f = click.option("--tls", is_flag=True, default=False, help="Connect with TLS (system root certificates).")(f)
    f = click.option("--token-file", type=click.Path(path_type=Path), default=None,
                     help="File whose first line is the bearer token (or set STYLECAST_AUTH_TOKEN).")(f)
    f = click.option("--server", default="127.0.0.1:50051",
                     help="HOST:PORT of the server, a gRPC target (dns:///NAME:PORT) or IP:PORT,IP:PORT replicas.")(f)
    return f


def _client(server: str, token_file: Path | None, tls: bool, tls_ca: Path | None, timeout: float):
    import os

    from serving.client import StyleClient
    token = os.environ.get("STYLECAST_AUTH_TOKEN") or None
    if token_file is not None:
        if not token_file.is_file():
            raise FileNotFoundError(f"token file not found: {token_file}")
        lines = [ln.strip() for ln in token_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise ValueError(f"token file {token_file} is empty")
        token = lines[0]
    if tls_ca is not None and not tls_ca.is_file():
        raise FileNotFoundError(f"CA file not found: {tls_ca}")
    load_balancing = click.get_current_context().meta.get("stylecast.load_balancing", "pick_first")
    return StyleClient(server, token=token, tls=tls, tls_ca=tls_ca, timeout=timeout,
                       load_balancing=None if load_balancing == "pick_first" else load_balancing)


def _rpc(fn):
    """Run an RPC; gRPC errors become one-line user errors (exit code 2)."""
    import grpc
    try:
        return fn()
    except grpc.RpcError as exc:
        raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None


@click.group(context_settings=CTX)
def client() -> None:
    """Call a running stylecast server.

    \b
    Example:
      stylecast client generate --server 127.0.0.1:50051 --model demo --seeds 0-3 --outdir out/
    """


@client.command("list", context_settings=CTX)
@_conn_options
def list_cmd(server: str, token_file: Path | None, tls: bool, tls_ca: Path | None, timeout: float) -> None:
    """List the server's models and their state.

    \b
    Example:
      stylecast client list --server 127.0.0.1:50051
    """
    from protos.stylecast.v1 import style_pb2 as pb
    with _client(server, token_file, tls, tls_ca, timeout) as c:
        models = _rpc(c.list_models)
    if not models:
        click.echo("no models")
    for m in models:
        state = pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower()
        line = f"{m.name:24s} {state:8s} {m.kind:10s}"
        if m.ready:
            line += f" v{m.version} {m.resolution}px z{m.z_dim} w{m.w_dim}x{m.num_ws} psi {m.default_psi:g} {m.backend}"
            if m.style_count:
                line += f" {m.style_count} styles"
        else:
            line += f" {m.error}"
        click.echo(line)


@client.command("info", context_settings=CTX)
@click.option("--model", required=True, help="Model name.")
@_conn_options
def info_cmd(model: str, server: str, token_file: Path | None, tls: bool, tls_ca: Path | None,
             timeout: float) -> None:
    """Show one model's details.

    \b
    Example:
      stylecast client info --model demo
    """
    from google.protobuf import json_format
    with _client(server, token_file, tls, tls_ca, timeout) as c:
        info = _rpc(lambda: c.get_model(model))
    click.echo(json_format.MessageToJson(info, always_print_fields_with_no_presence=True))


@client.command("styles", context_settings=CTX)
@click.option("--model", required=True, help="A dualstylegan model.")
@_conn_options
def styles_cmd(model: str, server: str, token_file: Path | None, tls: bool, tls_ca: Path | None,
               timeout: float) -> None:
    """List a dualstylegan model's style library (id, name) and its default per-layer weights.

    \b
    Example:
      stylecast client styles --model cartoon
    """
    with _client(server, token_file, tls, tls_ca, timeout) as c:
        resp = _rpc(lambda: c.list_styles_raw(model))
    for s in resp.styles:
        click.echo(f"{s.id:5d}  {s.name}")
    click.echo(f"{len(resp.styles)} styles; default weights {','.join(f'{v:g}' for v in resp.default_weights)} "
               f"(layers 0..{resp.res_index} structure, the rest colour)")


def _style_options(f):
    f = click.option("--preserve-color", "--preserve-colour", "preserve_color", is_flag=True, default=False,
                     help="dualstylegan: keep the content's colours (the official --preserve_color).")(f)
    f = click.option("--weights", default=None,
                     help="dualstylegan: per-layer extrinsic weights, num_ws values, e.g. 0.75*7,1*11 (default: the "
                          "model's).")(f)
    f = click.option("--style-image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="dualstylegan: an exemplar portrait to take the style from (instead of --style-id).")(f)
    f = click.option("--style-id", default=None,
                     help="dualstylegan: a library style, by id or name (see `stylecast client styles`; default 0).")(f)
    return f


def _style_kwargs(style_id: str | None, style_image: Path | None, weights: str | None,
                  preserve_color: bool) -> dict:
    """The StyleClient keyword arguments (style, weights, preserve_color) of the --style-* options."""
    from .export_dualstyle import parse_weights
    if style_id is not None and style_image is not None:
        raise ValueError("give either --style-id or --style-image, not both")
    style: int | str | bytes | None = None
    if style_id is not None:
        style = int(style_id) if style_id.isdigit() else style_id
    elif style_image is not None:
        style = style_image.read_bytes()
    kw: dict = {}
    if style is not None:
        kw["style"] = style
    if weights is not None:
        kw["weights"] = parse_weights(weights)
    if preserve_color:
        kw["preserve_color"] = True
    return kw


def _image_options(f):
    f = click.option("--size", default=None, help="Output size, e.g. 512 or 640x480 (Lanczos).")(f)
    f = click.option("--quality", type=click.IntRange(0, 100), default=0, help="JPEG/WebP quality (0 = 90).")(f)
    f = click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "webp", "raw"]), default="png")(f)
    f = click.option("--cutoff", type=click.IntRange(0, 64), default=None, help="Truncate only the first N latents.")(f)
    f = click.option("--psi", type=float, default=None, help="Truncation psi (default: the model's).")(f)
    return f


@client.command("generate", context_settings=CTX)
@click.option("--model", required=True, help="Model name.")
@click.option("--seeds", default="0-3", help="Seeds, e.g. 0-3,7.")
@click.option("--outdir", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@_image_options
@_style_options
@_conn_options
def generate_cmd(model: str, seeds: str, outdir: Path, psi: float | None, cutoff: int | None, fmt: str, quality: int,
                 size: str | None, style_id: str | None, style_image: Path | None, weights: str | None,
                 preserve_color: bool, server: str, token_file: Path | None, tls: bool, tls_ca: Path | None,
                 timeout: float) -> None:
    """Render seeds on the server and write seedNNNN.png (or .jpg/.webp/.rgb).

    \b
    Examples:
      stylecast client generate --server 127.0.0.1:50051 --model demo --seeds 0-3 --outdir out/
      stylecast client generate --model cartoon --seeds 0-3 --style-id 53 --psi 0.75 --outdir out/
    """
    from serving.client import parse_size
    from common.seeds import parse_seeds
    seed_list = parse_seeds(seeds)
    dims = parse_size(size)
    style_kw = _style_kwargs(style_id, style_image, weights, preserve_color)
    with _client(server, token_file, tls, tls_ca, timeout) as c:
        images = _rpc(lambda: c.generate(model, seeds=seed_list, psi=psi, cutoff=cutoff, fmt=fmt, quality=quality,
                                         size=dims, **style_kw))
    outdir.mkdir(parents=True, exist_ok=True)
    for img in images:
        img.save(outdir / f"seed{img.seed:04d}{img.extension}")
    click.echo(f"wrote {len(images)} image(s) to {outdir}")


@client.command("stream", context_settings=CTX)
@click.option("--model", required=True, help="Model name.")
@click.option("--seeds", default=None, help="Stream these seeds, e.g. 0-99.")
@click.option("--interpolate", default=None, help="Interpolate through these seeds (in order), e.g. 0,7,3.")
@click.option("--steps", type=click.IntRange(2, 100_000), default=30, help="Frames of the interpolation.")
@click.option("--mode", type=click.Choice(["slerp", "linear"]), default="slerp")
@click.option("--outdir", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@_image_options
@_conn_options
def stream_cmd(model: str, seeds: str | None, interpolate: str | None, steps: int, mode: str, outdir: Path,
               psi: float | None, cutoff: int | None, fmt: str, quality: int, size: str | None, server: str,
               token_file: Path | None, tls: bool, tls_ca: Path | None, timeout: float) -> None:
    """Stream seeds or an interpolation path; writes frameNNNN.png as each frame arrives.

    \b
    Example:
      stylecast client stream --model demo --interpolate 0,7 --steps 60 --outdir frames/
    """
    from serving.client import parse_size
    from common.seeds import parse_seeds
    if (seeds is None) == (interpolate is None):
        raise ValueError("give either --seeds or --interpolate")
    dims = parse_size(size)
    outdir.mkdir(parents=True, exist_ok=True)
    n = 0
    with _client(server, token_file, tls, tls_ca, timeout) as c:
        if seeds is not None:
            frames = c.generate_stream(model, seeds=parse_seeds(seeds), psi=psi, cutoff=cutoff, fmt=fmt,
                                       quality=quality, size=dims)
        else:
            frames = c.generate_stream(model, interpolate=parse_seeds(interpolate), steps=steps, mode=mode, psi=psi,
                                       cutoff=cutoff, fmt=fmt, quality=quality, size=dims)

        def consume() -> None:
            nonlocal n
            for img in frames:
                img.save(outdir / f"frame{img.index:04d}{img.extension}")
                n += 1
        _rpc(consume)
    click.echo(f"wrote {n} frame(s) to {outdir}")


@client.command("stylize", context_settings=CTX)
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="Model name (a fast_style model, or a face model with an encoder).")
@click.option("--outdir", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--faces", default="largest", help="Face models: 'largest', 'all' or an index (largest first).")
@click.option("--composite", type=click.Choice(["paste", "crop"]), default="paste",
              help="Face models: paste the stylized face(s) back into the photo, or return the aligned crop(s).")
@click.option("--feather", type=click.FloatRange(0, 0.5), default=0.0, help="Paste-back seam width (0 = 0.08).")
@click.option("--psi", type=float, default=None,
              help="Face models: truncation of the encoded latents (stylegan2: towards w_avg, default none; "
                   "dualstylegan: towards 0, default the model's).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "webp", "raw"]), default="png")
@click.option("--quality", type=click.IntRange(0, 100), default=0, help="JPEG/WebP quality (0 = 90).")
@click.option("--size", default=None, help="Output size, e.g. 512 or 640x480 (default: the photo's / crop's).")
@_style_options
@_conn_options
def stylize_cmd(photos: tuple[Path, ...], model: str, outdir: Path, faces: str, composite: str, feather: float,
                psi: float | None, fmt: str, quality: int, size: str | None, style_id: str | None,
                style_image: Path | None, weights: str | None, preserve_color: bool, server: str,
                token_file: Path | None, tls: bool, tls_ca: Path | None, timeout: float) -> None:
    """Stylize photos on the server; writes <photo stem>.<model>.png (and .faceK for every crop of --faces all).

    Several photos go through one StylizeStream; a photo that fails (no face, corrupt) is reported and the others
    are still written (exit code 1 when any failed).

    \b
    Examples:
      stylecast client stylize --model toon --outdir out/ me.jpg
      stylecast client stylize --model toon --faces all --composite crop --outdir out/ group.jpg
      stylecast client stylize --model cartoon --style-id 53 --preserve-color --outdir out/ me.jpg
    """
    from serving.client import _image, parse_size
    if faces not in ("largest", "all") and not faces.isdigit():
        raise ValueError(f"--faces must be 'largest', 'all' or an index, got {faces!r}")
    opts = dict(faces=int(faces) if faces.isdigit() else faces, composite=composite, feather=feather, psi=psi,
                fmt=fmt, quality=quality, size=parse_size(size),
                **_style_kwargs(style_id, style_image, weights, preserve_color))
    outdir.mkdir(parents=True, exist_ok=True)
    failed = written = 0
    with _client(server, token_file, tls, tls_ca, timeout) as c:
        def consume() -> None:
            nonlocal failed, written
            if len(photos) == 1:
                responses = [c.stylize_raw(c.stylize_request(model, photos[0].read_bytes(), **opts))]
            else:
                responses = c.stylize_stream(model, (p.read_bytes() for p in photos), **opts)
            for i, resp in enumerate(responses):
                src = photos[resp.index if len(photos) > 1 else i]
                if resp.error:
                    click.echo(f"{src}: {resp.error_code}: {resp.error}", err=True)
                    failed += 1
                    continue
                img = _image(resp.image)
                img.save(outdir / f"{src.stem}.{model}{img.extension}")
                written += 1
                for k, face in enumerate(resp.faces):
                    if face.crop.data and k > 0:
                        crop = _image(face.crop)
                        crop.save(outdir / f"{src.stem}.{model}.face{k}{crop.extension}")
        _rpc(consume)
    click.echo(f"wrote {written} image(s) to {outdir}" + (f"; {failed} photo(s) failed" if failed else ""))
    if failed:
        raise SystemExit(1)
