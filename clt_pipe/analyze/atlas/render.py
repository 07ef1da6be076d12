"""Atlas files: heatmap thumbnails (PNG), inline SVG bar plots and static HTML pages (no server, no network).

Layout under ``OUT/atlas/`` (every reference is relative, so a copy of the folder anywhere still works):

    index.html               per source layer: the shown features as a sortable, searchable table
    features/L<l>-F<f>.html  one page per shown feature
    img/L<l>-F<f>-<rank>.png top image ``rank`` with the feature's per-patch activation overlaid
    atlas.json               everything the pages show, machine-readable
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1300px;color:#222}table{border-collapse:collapse;"
       "font-size:12px;margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
       "th{background:#eee;cursor:pointer}td.l{text-align:left}.thumbs{display:flex;flex-wrap:wrap;gap:8px}"
       "figure{margin:0;font-size:11px;text-align:center}figure img{display:block;border:1px solid #999}"
       ".note{background:#fff6d6;padding:6px;border:1px solid #e5d38a}.grid{display:flex;gap:2em;flex-wrap:wrap}"
       "nav a{margin-right:1em}code{font-size:12px}")

JS = """
function filterRows(q){q=q.toLowerCase();document.querySelectorAll('tr[data-s]').forEach(function(r){
r.style.display=r.getAttribute('data-s').indexOf(q)>=0?'':'none';});}
function sortBy(th){var t=th.closest('table'),i=Array.prototype.indexOf.call(th.parentNode.children,th);
var rows=Array.prototype.slice.call(t.tBodies[0].rows),d=th.getAttribute('data-d')==='1'?-1:1;
th.setAttribute('data-d',d===1?'1':'0');rows.sort(function(a,b){var x=a.cells[i].getAttribute('data-v'),
y=b.cells[i].getAttribute('data-v');return (parseFloat(x)-parseFloat(y))*d||0;});
rows.forEach(function(r){t.tBodies[0].appendChild(r);});}
"""


def feature_id(layer: int, feature: int) -> str:
    return f"L{layer}-F{feature}"


def patch_grid(model: dict, n_patches: int) -> tuple[int, int]:
    """(rows, cols) of the ViT patch grid; falls back to a near-square grid when the metadata disagrees."""
    def pair(v):
        return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))

    try:
        (ih, iw), (ph, pw) = pair(model["image_size"]), pair(model["patch_size"])
        if (ih // ph) * (iw // pw) == n_patches:
            return ih // ph, iw // pw
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    gh = max(1, int(math.isqrt(n_patches)))
    return gh, -(-n_patches // gh)


def heat_grid(pos: np.ndarray, acts: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[gh, gw] activation per patch (NaN where the store holds no slot for the patch)."""
    gh, gw = grid
    g = np.full(gh * gw, np.nan)
    m = (pos > 0) & (pos <= gh * gw)
    g[pos[m] - 1] = acts[m]
    return g.reshape(gh, gw)


def heatmap_png(path: Path, heat: np.ndarray, vmax: float, px: int, base: np.ndarray | None) -> None:
    """Overlay ``heat`` (upsampled to px × px with nearest-neighbour, so patches stay visible as blocks) on
    ``base`` with alpha ∝ activation; without a base, on a grey canvas at full strength."""
    from matplotlib import colormaps

    norm = np.nan_to_num(heat / vmax if vmax > 0 else np.zeros_like(heat), nan=0.0).clip(0, 1)
    up = np.asarray(Image.fromarray(norm.astype(np.float32), mode="F").resize((px, px), Image.Resampling.NEAREST))
    colour = colormaps["inferno"](up)[..., :3] * 255.0
    if base is None:
        canvas = np.full((px, px, 3), 128.0)
        alpha = (up > 0).astype(np.float64)[..., None]
    else:
        canvas = base.astype(np.float64)
        alpha = (0.8 * up)[..., None]
    out = canvas * (1 - alpha) + colour * alpha
    Image.fromarray(out.round().clip(0, 255).astype(np.uint8)).save(path)


def bars_svg(values: list[float], labels: list[str], title: str, highlight: int | None = None,
             width: int = 260, height: int = 110) -> str:
    """A small inline SVG bar plot (non-negative values)."""
    n = max(1, len(values))
    top = max([v for v in values if np.isfinite(v)] + [1e-12])
    bw = (width - 30) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}"><text x="2" y="11" font-size="11">{html.escape(title)}</text>']
    for i, v in enumerate(values):
        h = 0 if not np.isfinite(v) else (height - 34) * v / top
        x = 25 + i * bw
        fill = "#c0392b" if i == highlight else "#2c7fb8"
        parts.append(f'<rect x="{x + 1:.1f}" y="{height - 18 - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="{fill}"><title>{html.escape(labels[i])}: {v:.4g}</title></rect>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{height - 5}" font-size="9" text-anchor="middle">'
                     f'{html.escape(labels[i])}</text>')
    parts.append(f'<text x="2" y="{height - 20}" font-size="8">0</text><text x="2" y="22" font-size="8">'
                 f'{top:.3g}</text></svg>')
    return "".join(parts)


def _clean(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to null."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{JS}</script></head><body>{body}</body></html>")


def _num(v: float, fmt: str = ".4g") -> str:
    return f'<td data-v="{v if np.isfinite(v) else -1}">{format(v, fmt) if np.isfinite(v) else "–"}</td>'


def _fig(img: dict, prefix: str) -> str:
    cap = (f"#{img['image']} {html.escape(str(img['class']))}<br>max {img['max_act']:.3g} · "
           f"CLS {img['cls_act']:.3g}" if img['cls_act'] == img['cls_act'] else
           f"#{img['image']} {html.escape(str(img['class']))}<br>max {img['max_act']:.3g} · CLS –")
    return (f"<figure><img src='{prefix}{img['png']}' width='{img['px']}' height='{img['px']}' "
            f"alt='image {img['image']}'><figcaption>{cap}</figcaption></figure>")


def write_pages(root: Path, atlas: dict) -> Path:
    """index.html, one page per feature and atlas.json under ``root`` (PNGs are written before)."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    feats = atlas["features"]
    L = atlas["n_layers"]
    head = (f"<p>Store <code>{html.escape(atlas['store'])}</code>, CLT <code>{html.escape(atlas['clt'])}</code> "
            f"({atlas['n_tokens']['cls']} CLS + {atlas['n_tokens']['patches']} patch tokens of "
            f"{atlas['n_images']} images scanned).</p>")
    note = (f"<p class='note'>Thumbnails show the heatmap only: {html.escape(atlas['images_note'])}</p>"
            if atlas.get("images_note") else "")
    about = ("<p>Features per layer: the top by <b>score</b> = mean |activation| over all tokens (= firing "
             "density × mean activation when firing), plus any listed with <code>--features</code>. Top images: "
             "largest activation over any token. Heatmap: per-patch activation on the ViT patch grid "
             "(nearest-neighbour upsampling; colour scale shared by the feature's images, inferno).</p>")
    body = [f"<h1>Feature atlas</h1>{head}{about}{note}<nav>" +
            "".join(f"<a href='#layer-{layer}'>layer {layer}</a>" for layer in range(L)) + "</nav>",
            "<p><input id='q' placeholder='search: layer, feature, class…' oninput='filterRows(this.value)' "
            "size='40'></p>"]
    for layer in range(L):
        rows = [f for f in feats if f["layer"] == layer]
        body.append(f"<section id='layer-{layer}'><h2>Source layer {layer}</h2>")
        if not rows:
            body.append("<p>no feature of this layer is shown (none fired).</p></section>")
            continue
        body.append("<table><thead><tr>" + "".join(
            f"<th onclick='sortBy(this)'>{c}</th>" for c in (
                "feature", "score", "density CLS", "density patches", "mean act CLS", "mean act patches",
                "pushes towards", "top image")) + "</tr></thead><tbody>")
        for f in rows:
            fid = feature_id(f["layer"], f["feature"])
            tow = ", ".join(c["class"] for c in f["logits"]["towards"][:3])
            thumb = (f"<img src='{f['images'][0]['png']}' width='32' height='32' alt='top image'>"
                     if f["images"] else "")
            search = f"{fid} {f['layer']}:{f['feature']} {tow} {' '.join(str(i['class']) for i in f['images'])}"
            body.append(f"<tr data-s='{html.escape(search.lower())}'><td class='l' data-v='{f['feature']}'>"
                        f"<a href='features/{fid}.html'>{fid}</a>{' ★' if f['listed'] else ''}</td>"
                        + _num(f["score"]) + _num(f["density_cls"]) + _num(f["density_patches"])
                        + _num(f["mean_act_cls"]) + _num(f["mean_act_patches"])
                        + f"<td class='l'>{html.escape(tow)}</td><td data-v='0'>{thumb}</td></tr>")
        body.append("</tbody></table></section>")
    (root / "index.html").write_text(_page("Feature atlas", "\n".join(body)), encoding="utf-8")

    for n, f in enumerate(feats):
        fid = feature_id(f["layer"], f["feature"])
        nav = [f"<a href='../index.html#layer-{f['layer']}'>index</a>"]
        if n > 0:
            nav.append(f"<a href='{feature_id(feats[n - 1]['layer'], feats[n - 1]['feature'])}.html'>previous</a>")
        if n + 1 < len(feats):
            nav.append(f"<a href='{feature_id(feats[n + 1]['layer'], feats[n + 1]['feature'])}.html'>next</a>")
        stats = ("<table><tr><th></th><th>CLS</th><th>patches</th></tr>"
                 f"<tr><td class='l'>firing density</td>{_num(f['density_cls'])}{_num(f['density_patches'])}</tr>"
                 f"<tr><td class='l'>mean activation when firing</td>{_num(f['mean_act_cls'])}"
                 f"{_num(f['mean_act_patches'])}</tr></table><p>score {f['score']:.4g}"
                 f"{' · listed with --features' if f['listed'] else ''}</p>")
        fp = bars_svg(f["footprint"], [str(t) for t in range(L)], "decoder norm into target layer",
                      highlight=f["layer"])
        lg = "<table><tr><th>pushes towards</th><th>Δlogit</th><th>away from</th><th>Δlogit</th></tr>" + "".join(
            f"<tr><td class='l'>{html.escape(a['class'])}</td>{_num(a['dlogit'], '+.3g')}"
            f"<td class='l'>{html.escape(b['class'])}</td>{_num(b['dlogit'], '+.3g')}</tr>"
            for a, b in zip(f["logits"]["towards"], f["logits"]["away"])) + "</table>"
        thumbs = ("<div class='thumbs'>" + "".join(_fig(i, "../") for i in f["images"]) + "</div>"
                  if f["images"] else "<p>the feature never fired on the scanned tokens.</p>")
        body = (f"<nav>{''.join(nav)}</nav><h1>Feature {fid}</h1>{note}<div class='grid'><div>{stats}</div>"
                f"<div>{fp}</div><div><p>direct effect on zero-shot logits per unit activation "
                f"({html.escape(atlas['template_set'])} classifier)</p>{lg}</div></div>"
                f"<h2>Top {len(f['images'])} images</h2>{thumbs}")
        (root / "features" / f"{fid}.html").write_text(_page(f"Feature {fid}", body), encoding="utf-8")
    (root / "atlas.json").write_text(json.dumps(_clean(atlas), indent=1, allow_nan=False))
    return root / "index.html"
