"""report.html: one page a person opens to see what a run did."""

from __future__ import annotations

import html
import json
from pathlib import Path


def _table(rows: dict) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _comparison(summary: dict) -> str:
    """Base vs final evaluation metrics, with the relative change."""
    base, final = summary.get("base", {}), summary.get("final", {})
    if not final:
        return ""
    rows = []
    for key in sorted(final):
        b, f = base.get(key), final[key]
        change = f"{(f - b) / abs(b):+.1%}" if isinstance(b, float) and b != 0 else ""
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{_fmt(b) if b is not None else ''}</td>"
                    f"<td>{_fmt(f)}</td><td>{change}</td></tr>")
    return ("<h2>Before and after training</h2><table><tr><th>metric (fixed prompts and seeds)</th><th>base</th>"
            f"<th>final</th><th>change</th></tr>{''.join(rows)}</table>")


def write_report(run_dir: Path, title: str, summary: dict, records: list[dict]) -> Path:
    """Writes ``run_dir/report.html`` with the summary, curves, before/after grids and the metrics table."""
    run_dir = Path(run_dir)
    images = []
    for name, caption in [("samples/before.png", "Before training (base model)"),
                          ("samples/after.png", "After training (same prompts and seeds)")]:
        if (run_dir / name).exists():
            images.append(f"<figure><figcaption>{caption}</figcaption><img src='{name}'></figure>")
    plots = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "plots").glob("*.png"))
    plot_html = "".join(f"<figure><img src='{p}'></figure>" for p in plots)
    keys = sorted({k for r in records for k in r})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                   for r in records)
    config = (run_dir / "config.json").read_text() if (run_dir / "config.json").exists() else "{}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
figure {{ display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }}
figcaption {{ font-weight: 600; margin-bottom: .4em; }}
img {{ image-rendering: pixelated; max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; font-size: 12px; overflow: auto; max-height: 30em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{_comparison(summary)}
<h2>Run</h2>{_table({k: v for k, v in summary.items() if k not in ("base", "final")})}
<h2>Curves</h2>{plot_html or '<p>No plots.</p>'}
<h2>Samples</h2>{''.join(images) or '<p>No sample grids.</p>'}
<h2>Metrics per epoch</h2><div style="overflow:auto"><table><tr>{head}</tr>{body}</table></div>
<h2>Resolved config</h2><pre>{html.escape(json.dumps(json.loads(config), indent=2))}</pre>
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
