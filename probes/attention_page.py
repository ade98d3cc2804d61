"""The attention view's page: HTML, styles and script, all inline (no network), around the view's JSON.

The script reads the data from a <script type="application/json"> element (``attention_view.page_json``
makes it safe there) and draws with DOM elements only, setting text with ``textContent`` so token
texts are never read as HTML.
"""
from __future__ import annotations

import html

CSS = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 0.3em 0; } h3 { font-size: 1em; margin: 0.8em 0 0.3em 0; }
.meta { color: #555; font-size: 0.9em; }
#controls { display: flex; gap: 1em; align-items: center; margin: 0.6em 0; flex-wrap: wrap; }
#readout { font-family: monospace; background: #f4f4f4; padding: 0.3em 0.6em; min-height: 1.4em; }
#readout-value { color: #08519c; }
#strip { margin: 0.4em 0; }
#strip span { display: inline-block; font-family: monospace; padding: 0 0.15em; margin: 1px; line-height: 1.4;
  border: 1px solid #ddd; white-space: pre; cursor: pointer; }
#strip span.query { outline: 2px solid #d62728; }
.main { display: flex; gap: 1.5em; align-items: flex-start; }
.heat-wrap { overflow: auto; max-width: 60vw; max-height: 85vh; border: 1px solid #ddd; }
#heat { border-collapse: collapse; font-size: var(--label, 10px); }
#heat td { width: var(--cell, 14px); height: var(--cell, 14px); min-width: var(--cell, 14px); padding: 0;
  border: 1px solid #f2f2f2; cursor: crosshair; }
#heat td.masked { background: #fafafa; cursor: default; }
#heat tr.query th { color: #d62728; }
#heat th { font-weight: normal; font-family: monospace; white-space: pre; padding: 0 0.3em; text-align: right; }
#heat thead th { writing-mode: vertical-rl; text-align: left; padding: 0.3em 0; }
.side { flex: 1; min-width: 24em; overflow-x: auto; }
.side table { border-collapse: collapse; font-size: 0.85em; }
.side td, .side th { border: 1px solid #ddd; padding: 0.1em 0.4em; font-family: monospace; white-space: pre; }
.side td.current { outline: 2px solid #d62728; }
#dla td { cursor: pointer; text-align: right; }
"""

SCRIPT = r"""
'use strict';
const D = JSON.parse(document.getElementById('view-data').textContent);
const S = D.tokens.length, NL = D.n_layer, NH = D.n_head;
const $ = (id) => document.getElementById(id);
const state = { layer: 0, head: 0, query: S - 1, cell: null };
const cells = [];

// Whitespace made visible, so that a space or newline token can be seen and pointed at.
const shown = (text) => (text.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5') || '\u2205');
const tokenName = (id) => shown(D.strings[String(id)]);
function make(tag, text, parent) {
  const element = document.createElement(tag);
  if (text !== undefined) element.textContent = text;
  if (parent) parent.appendChild(element);
  return element;
}
// Show a number and what it is; cell = [q, k] when it is a pattern cell's (read again on a head change).
function read(what, value, cell = null) {
  state.cell = cell;
  $('readout-what').textContent = what;
  $('readout-value').textContent = value === null ? 'n/a' : String(value);
}
const blue = (w) => `rgba(8, 81, 156, ${Math.max(0, Math.min(1, w))})`;
function diverging(value, limit) {
  const a = limit > 0 ? Math.min(1, Math.abs(value) / limit) : 0;
  return value >= 0 ? `rgba(214, 39, 40, ${a})` : `rgba(31, 119, 180, ${a})`;
}

function buildPickers() {
  for (let i = 0; i < NL; i++) make('option', `block ${i}`, $('layer')).value = i;
  for (let i = 0; i < NH; i++) make('option', `head ${i}`, $('head')).value = i;
  $('layer').addEventListener('change', () => pick(Number($('layer').value), state.head));
  $('head').addEventListener('change', () => pick(state.layer, Number($('head').value)));
}

function buildHeat() {
  const size = Math.max(6, Math.min(22, Math.floor(640 / S)));
  document.documentElement.style.setProperty('--cell', size + 'px');
  document.documentElement.style.setProperty('--label', Math.max(7, Math.min(11, size - 2)) + 'px');
  const top = make('tr', undefined, make('thead', undefined, $('heat')));
  make('th', 'query \\ key', top);
  D.tokens.forEach((t, k) => make('th', `${k} ${shown(t)}`, top));
  const body = make('tbody', undefined, $('heat'));
  for (let q = 0; q < S; q++) {
    const row = make('tr', undefined, body);
    make('th', `${q} ${shown(D.tokens[q])}`, row);
    cells.push([]);
    for (let k = 0; k < S; k++) {
      const td = make('td', undefined, row);
      td.dataset.q = q; td.dataset.k = k;
      if (k > q) td.className = 'masked';
      cells[q].push(td);
    }
  }
  body.addEventListener('mouseover', (event) => {
    const td = event.target.closest('td');
    if (!td || td.className === 'masked') return;
    readCell([Number(td.dataset.q), Number(td.dataset.k)]);
  });
  body.addEventListener('click', (event) => {
    const td = event.target.closest('td, th');
    if (td && td.parentElement.rowIndex > 0) choose(td.parentElement.rowIndex - 1);
  });
}

// The weight under the pointer, read again when the picker changes the head beneath it.
function readCell(cell = state.cell) {
  if (!cell) return;
  const [q, k] = cell;
  read(`block ${state.layer} head ${state.head}: query ${q} ${shown(D.tokens[q])} \u2192 key ${k} ` +
       `${shown(D.tokens[k])}: weight`, D.patterns[state.layer][state.head][q][k], cell);
}

function buildStrip() {
  D.tokens.forEach((t, k) => {
    const span = make('span', shown(t), $('strip'));
    span.dataset.k = k;
    span.addEventListener('click', () => choose(k));
    span.addEventListener('mouseover', () => {
      const row = D.patterns[state.layer][state.head][state.query];
      read(`block ${state.layer} head ${state.head}: query ${state.query} \u2192 key ${k} ${shown(t)}: weight`,
           k <= state.query ? row[k] : 0);
    });
  });
}

function paint() {
  const pattern = D.patterns[state.layer][state.head];
  for (let q = 0; q < S; q++) for (let k = 0; k <= q; k++) cells[q][k].style.background = blue(pattern[q][k]);
  const row = pattern[state.query];
  $('strip').querySelectorAll('span').forEach((span, k) => {
    span.style.background = k <= state.query ? blue(row[k]) : '';
    span.style.color = k <= state.query && row[k] > 0.55 ? 'white' : '';
    span.className = k === state.query ? 'query' : '';
  });
  $('heat').querySelectorAll('tbody tr').forEach((tr, q) => { tr.className = q === state.query ? 'query' : ''; });
  $('shown-head').textContent = `block ${state.layer}, head ${state.head}`;
}

function pick(layer, head) {
  state.layer = layer; state.head = head;
  $('layer').value = layer; $('head').value = head;
  paint(); sidePanels(); readCell();
}

function choose(q) { state.query = q; paint(); sidePanels(); }

function lensPanel(q) {
  const lens = D.lens, target = D.attribution.target[q];
  $('lens-title').textContent = `Logit lens at position ${q} ${shown(D.tokens[q])}: prediction ${tokenName(target)}`;
  const table = $('lens');
  table.textContent = '';
  const top = make('tr', undefined, table);
  make('th', 'state', top); make('th', `p(${tokenName(target)})`, top);
  lens.top_ids[q][0].forEach((_, j) => make('th', `top ${j + 1}`, top));
  lens.labels.forEach((label, i) => {
    const row = make('tr', undefined, table);
    make('th', label, row);
    const p = lens.predicted_prob[q][i];
    const cell = make('td', p === null ? 'n/a' : p.toPrecision(2), row);
    cell.style.background = blue(p);
    if (p > 0.55) cell.style.color = 'white';
    cell.addEventListener('mouseover', () => read(`lens ${label} at ${q}: p(${tokenName(target)})`, p));
    lens.top_ids[q][i].forEach((id, j) => {
      const prob = lens.top_probs[q][i][j];
      const c = make('td', `${tokenName(id)} ${prob === null ? 'n/a' : prob.toPrecision(2)}`, row);
      c.style.background = blue(0.6 * prob);
      c.addEventListener('mouseover', () => read(`lens ${label} at ${q}: p(${tokenName(id)})`, prob));
    });
  });
}

function attributionPanel(q) {
  const a = D.attribution, parts = a.parts[q], width = NH + 2;
  const limit = Math.max(...parts.map((v) => Math.abs(v || 0)));
  $('dla-title').textContent = `Direct logit attribution of ${tokenName(a.target[q])} at position ${q}`;
  $('dla-sum').textContent = `logit ${a.logit[q]} = embed ${parts[0]} + pos_embed ${parts[1]} + the parts below ` +
    `+ ln_f bias ${a.ln_f_bias[q]} (ln_f scale frozen at \u03c3 = ${a.sigma[q]}; |sum - logit| = ${a.sum_error[q]})`;
  const table = $('dla');
  table.textContent = '';
  const top = make('tr', undefined, table);
  make('th', 'block', top);
  for (let h = 0; h < NH; h++) make('th', `h${h}`, top);
  make('th', 'attn bias', top); make('th', 'mlp', top);
  for (let layer = 0; layer < NL; layer++) {
    const row = make('tr', undefined, table);
    make('th', `b${layer}`, row);
    for (let j = 0; j < width; j++) {
      const value = parts[2 + layer * width + j];
      const name = j < NH ? `b${layer}.h${j}` : `b${layer}.${j === NH ? 'attn_bias' : 'mlp'}`;
      const cell = make('td', value === null ? 'n/a' : value.toPrecision(2), row);
      cell.style.background = diverging(value, limit);
      if (j < NH && layer === state.layer && j === state.head) cell.className = 'current';
      cell.addEventListener('mouseover', () => read(`direct contribution of ${name} to ${tokenName(a.target[q])}`,
                                                    value));
      if (j < NH) cell.addEventListener('click', () => pick(layer, j));
    }
  }
}

function sidePanels() { lensPanel(state.query); attributionPanel(state.query); }

buildPickers(); buildHeat(); buildStrip(); pick(0, 0);
"""

BODY = """
<h1>Attention, seen</h1>
<p class="meta">{meta}</p>
<p class="meta">Pick a block and head; hover a cell of the pattern to read its weight (rows: queries, columns:
keys; a query sees itself and the tokens before it). Click a token or a row to choose the query position the
logit lens and the attribution read; click a head in the attribution to show its pattern. Numbers are kept to
4 significant digits.</p>
<div id="controls"><label>Layer <select id="layer"></select></label><label>Head <select id="head"></select></label>
<span>showing <b id="shown-head"></b></span></div>
<div id="readout"><span id="readout-what">hover a cell to read its number</span> <b id="readout-value"></b></div>
<div id="strip"></div>
<div class="main"><div class="heat-wrap"><table id="heat"></table></div>
<div class="side"><h3 id="lens-title"></h3><table id="lens"></table>
<h3 id="dla-title"></h3><p class="meta" id="dla-sum"></p><table id="dla"></table></div></div>
"""


def render_attention_view(data_json: str, title: str = "", meta: str = "") -> str:
    """The whole page around ``data_json`` (already safe inside <script>: see ``attention_view.page_json``).

    title, meta: plain text for the page's title and its line about the model (escaped here).
    """
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or 'attention view')}"
            f"</title><style>{CSS}</style></head><body>{BODY.format(meta=html.escape(meta))}"
            f"<script type='application/json' id='view-data'>{data_json}</script>"
            f"<script>{SCRIPT}</script></body></html>")
