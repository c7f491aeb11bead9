"""`essa report RUN_DIR`: one self-contained HTML page of a run (no network needed to open it).

The recipe, reward curves (population mean and max, held-out), time per phase and memory per
iteration, whether the search could learn (essa.search_signal), the held-out completions of the
initial adapter and of the best center side by side with their rewards (for IFEval rows, accuracy
per instruction type before and after), and the export command. The curves are drawn in the page by
a few lines of our own script from the metrics embedded as JSON: a plotting library would have to be
inlined whole (hundreds of KB) for a few line charts. Every text from the run (completions included)
is HTML-escaped: model output is shown, never interpreted.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from essa import checkpoint, completions
from essa.errors import EssaError
from essa.files import write_text
from essa.metrics import MetricsLog
from essa.run_dir import CHECKPOINTS, METRICS_FILE, RECIPE_FILE, REPORT_FILE, WARM_START_SUMMARY

CHARTS = {
    "reward": ["reward_mean", "reward_max", "heldout_reward"],
    "seconds per phase": ["seconds_generate", "seconds_score", "seconds_update", "seconds_eval"],
    "peak memory (MB)": ["peak_memory_mb"],
    "members against the center": ["diverged_share", "rank_correlation"],
    "signal to noise of the members' rewards": ["reward_snr"],
}

SCRIPT = """
window.addEventListener('error', e => {
  const pre = document.createElement('pre'); pre.id = 'script-error'; pre.textContent = String(e.message);
  document.body.prepend(pre);
});
const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728'];
function chart(el, rows, keys) {
  const W = 640, H = 240, L = 56, B = 28, ns = 'http://www.w3.org/2000/svg';
  const series = keys.map(k => ({k, pts: rows.filter(r => typeof r[k] === 'number').map(r => [r.iteration, r[k]])}))
                     .filter(s => s.pts.length);
  const all = series.flatMap(s => s.pts);
  if (!all.length) { el.textContent = 'no data'; return; }
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys, 0), y1 = Math.max(...ys, y0 + 1e-9);
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - 10), sy = y => H - B - (y - y0) / (y1 - y0) * (H - B - 10);
  const svg = document.createElementNS(ns, 'svg'); svg.setAttribute('viewBox', `0 0 ${W} ${H + 20 * series.length}`);
  const add = (tag, attrs, text) => { const n = document.createElementNS(ns, tag);
    for (const [a, v] of Object.entries(attrs)) n.setAttribute(a, v); if (text !== undefined) n.textContent = text;
    svg.appendChild(n); return n; };
  add('line', {x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: '#888'});
  add('line', {x1: L, y1: 10, x2: L, y2: H - B, stroke: '#888'});
  for (const t of [y0, (y0 + y1) / 2, y1]) add('text', {x: 4, y: sy(t) + 4, 'font-size': 11}, t.toPrecision(3));
  for (const t of [x0, x1]) add('text', {x: sx(t) - 4, y: H - 8, 'font-size': 11}, String(t));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    add('polyline', {class: 'curve', 'data-key': s.k, fill: 'none', stroke: color, 'stroke-width': 2,
                     points: s.pts.map(p => `${sx(p[0])},${sy(p[1])}`).join(' ')});
    for (const p of s.pts) add('circle', {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color});
    add('text', {x: L, y: H + 14 + 20 * i, fill: color, 'font-size': 12}, s.k);
  });
  el.appendChild(svg);
}
const rows = JSON.parse(document.getElementById('metrics').textContent);
const charts = JSON.parse(document.getElementById('charts').textContent);
for (const [title, keys] of Object.entries(charts)) {
  chart(document.querySelector(`[data-chart="${title}"]`), rows, keys);
}
document.body.dataset.rendered = 'yes';
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; } td, th { border: 1px solid #ddd; padding: 4px 6px;
vertical-align: top; text-align: left; } th { background: #f4f4f4; } pre { background: #f7f7f7; padding: 8px;
overflow-x: auto; } .charts { display: flex; flex-wrap: wrap; gap: 1em; } .chart { flex: 1 1 360px; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; } .num { text-align: right; }
"""


def _json_script(element_id: str, value: Any) -> str:
    # "</" would end the script element early; JSON allows it escaped.
    text = json.dumps(value).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def best_iteration(run_dir: Path) -> int | None:
    ckpt, _ = checkpoint.latest(run_dir / CHECKPOINTS)
    return None if ckpt is None else int(ckpt.meta["best_iteration"])


def per_instruction(rows: list[dict[str, Any]]) -> dict[str, float]:
    followed: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        for instruction, ok in zip(row.get("instructions", []), row.get("strict", [])):
            followed[instruction].append(bool(ok))
    return {k: sum(v) / len(v) for k, v in sorted(followed.items())}


def _completions_table(base: list[dict], best: list[dict], best_at: int) -> str:
    head = (f"<tr><th>#</th><th>prompt</th><th>initial adapter (iteration 0)</th><th class=num>reward</th>"
            f"<th>best center (iteration {best_at})</th><th class=num>reward</th></tr>")
    body = "".join(f"<tr><td>{i + 1}</td><td class=text>{html.escape(a['prompt'])}</td>"
                   f"<td class=text>{html.escape(a['completion'])}</td><td class=num>{a['reward']:.3f}</td>"
                   f"<td class=text>{html.escape(b['completion'])}</td><td class=num>{b['reward']:.3f}</td></tr>"
                   for i, (a, b) in enumerate(zip(base, best)))
    return f'<table id="completions">{head}{body}</table>'


def _instruction_table(base: list[dict], best: list[dict]) -> str:
    before, after = per_instruction(base), per_instruction(best)
    if not before:
        return ""
    body = "".join(f"<tr><td>{html.escape(k)}</td><td class=num>{before[k]:.3f}</td>"
                   f"<td class=num>{after.get(k, 0.0):.3f}</td></tr>" for k in before)
    return ("<h2>IFEval: strict accuracy per instruction type</h2><table id=instructions><tr><th>instruction</th>"
            f"<th class=num>initial</th><th class=num>best center</th></tr>{body}</table>")


def _warm_start(run_dir: Path, held: list[dict]) -> str:
    """The warm start's line: what the base model scored, what the fine-tune made of it, and its cost."""
    path = run_dir / WARM_START_SUMMARY
    if not path.is_file():
        return ""
    warm = json.loads(path.read_text())
    after = f" → {held[0]['heldout_reward']:.4f} after it" if held else ""
    return (f"<p id=warm-start>warm start ({html.escape(warm['method'])}): held-out reward of the base model "
            f"{warm['base_heldout_reward']:.4f}{after}; {warm['examples']} examples, {warm['sft_steps']} "
            f"fine-tune steps, {warm['seconds']:.0f} s, peak memory {warm['peak_memory_mb']:.0f} MB</p>")


def _signal(rows: list[dict[str, Any]]) -> str:
    """One line on whether the members' rewards could steer the search (essa.search_signal says how)."""
    steps = [r for r in rows if "reward_snr" in r]
    if not steps:
        return ""
    snr = sum(r["reward_snr"] for r in steps) / len(steps)
    diverged = sum(r["diverged_share"] for r in steps) / len(steps)
    ranks = [r["rank_correlation"] for r in steps if "rank_correlation" in r]
    verdict = ("the members' ranking was mostly the minibatch's noise: more prompts per iteration or a larger "
               "sigma would give the search more to follow" if snr < 1.5 else
               "the members' rewards spread beyond the minibatch's noise")
    rank = f"; minibatch vs held-out rank correlation {sum(ranks) / len(ranks):.2f}" if ranks else ""
    return (f"<p id=signal>search signal, mean over {len(steps)} iterations: {diverged:.0%} of member completions "
            f"differ from the center's; signal to noise {snr:.2f} ({html.escape(verdict)}){rank}</p>")


def render(run_dir: Path) -> str:
    recipe_path, metrics_path = run_dir / RECIPE_FILE, run_dir / METRICS_FILE
    if not recipe_path.is_file() or not metrics_path.is_file():
        raise EssaError(f"essa report: {run_dir} has no {RECIPE_FILE}/{METRICS_FILE}; is it an `essa align` output?")
    recipe = json.loads(recipe_path.read_text())
    rows = MetricsLog(metrics_path).read()
    best_at = best_iteration(run_dir)
    base = completions.read(run_dir, 0)
    best = completions.read(run_dir, best_at) if best_at is not None else None
    held = [r for r in rows if r.get("heldout_reward") is not None]
    summary = (f"held-out reward: initial {held[0]['heldout_reward']:.4f}, final {held[-1]['heldout_reward']:.4f}"
               if held else "no held-out evaluation yet")
    charts = "".join(f'<div class=chart><h3>{html.escape(t)}</h3><div data-chart="{html.escape(t)}"></div></div>'
                     for t in CHARTS)
    sections = [f"<h1>essa run: {html.escape(run_dir.name)}</h1>",
                f"<p>{html.escape(summary)}; {len(rows) - 1} iterations in metrics.jsonl"
                + (f"; best center at iteration {best_at}" if best_at is not None else "") + "</p>",
                _warm_start(run_dir, held), _signal(rows),
                f"<div class=charts>{charts}</div>"]
    if base and best:
        sections += ["<h2>Held-out completions: initial adapter and best center</h2>",
                     _completions_table(base, best, best_at), _instruction_table(base, best)]
    else:
        sections.append("<p>No held-out completions saved in this run directory (completions/).</p>")
    sections += ["<h2>Export</h2>",
                 f"<pre>essa export {html.escape(str(run_dir))} --adapter ADAPTER_DIR      # a PEFT adapter\n"
                 f"essa export {html.escape(str(run_dir))} --merged MODEL_DIR         # a merged model</pre>",
                 "<h2>Recipe</h2>", f"<pre>{html.escape(json.dumps(recipe, indent=1))}</pre>"]
    return (f"<!doctype html><html><head><meta charset=utf-8><title>essa report: {html.escape(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}"
            f"{_json_script('metrics', rows)}{_json_script('charts', CHARTS)}<script>{SCRIPT}</script></body></html>")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    out = out or run_dir / REPORT_FILE
    write_text(out, render(run_dir))
    return out
