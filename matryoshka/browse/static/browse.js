/* The feature browser's only script: loads a run's data shards on demand and renders its pages.
   Data files are scripts calling browse.put(key, data) (file:// forbids fetch); see matryoshka/browse/site.py. */
"use strict";
window.browse = (() => {
  const store = {}, waiting = {};

  function put(key, data) {
    store[key] = data;
    (waiting[key] || []).forEach(([resolve]) => resolve(data));
    delete waiting[key];
  }

  function load(src, key) {
    if (key in store) return Promise.resolve(store[key]);
    return new Promise((resolve, reject) => {
      const first = !waiting[key];
      (waiting[key] = waiting[key] || []).push([resolve, reject]);
      if (!first) return;
      const s = document.createElement("script");
      s.src = src;
      s.onerror = () => { (waiting[key] || []).forEach(([, rej]) => rej(new Error("cannot load " + src))); delete waiting[key]; };
      document.head.appendChild(s);
    });
  }

  const meta = () => store.meta;
  const param = (name) => new URLSearchParams(location.search).get(name);
  const pad = (n) => String(n).padStart(5, "0");

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else if (k === "cls") e.className = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }

  function shard(i) {
    const n = Math.floor(i / meta().shard);
    return load(`data/s/${pad(n)}.js`, "s" + n);
  }

  const shown = (s) => s.replace(/\r/g, "").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
  const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : Number(v).toPrecision(d);

  function latentLink(i, label) {
    return el("a", {href: `latent.html?i=${i}`, cls: "latent-link", "data-id": String(i)},
              `#${i}` + (label ? ` ${shown(label)}` : ""));
  }

  function context(ctx, strings) {
    const line = el("div", {cls: "ctx"});
    line.append(el("span", {cls: "val", text: fmt(ctx.v)}));
    ctx.t.forEach((t, k) => {
      const a = ctx.a[k];
      const span = el("span", {cls: "tok" + (k === ctx.c ? " centre" : "") + (a > 0 ? " on" : "") + (a < 0 ? " unknown" : ""),
                               title: a < 0 ? "not encoded" : `${a}% of the top activation`, text: shown(strings[t])});
      if (a > 0) span.style.background = `rgba(255, 110, 0, ${Math.min(1, 0.12 + 0.88 * a / 100).toFixed(3)})`;
      line.append(span);
    });
    return line;
  }

  function histogram(counts, max) {
    const w = 360, h = 90, n = counts.length, top = Math.max(1, ...counts);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 16); svg.setAttribute("class", "hist");
    counts.forEach((c, k) => {
      const r = document.createElementNS(ns, "rect"), bh = h * Math.sqrt(c / top);
      r.setAttribute("x", k * w / n + 1); r.setAttribute("width", w / n - 2);
      r.setAttribute("y", h - bh); r.setAttribute("height", bh);
      r.setAttribute("data-count", c);
      svg.append(r);
    });
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 0); label.setAttribute("y", h + 13);
    label.textContent = `0 … ${fmt(max)} (bar height: sqrt of count)`;
    svg.append(label);
    return svg;
  }

  async function latentPage(root) {
    const m = meta(), raw = param("i"), i = raw === null ? m.start : Number(raw);
    if (!Number.isInteger(i) || i < 0 || i >= m.width) {
      root.textContent = `No latent ${raw}: this dictionary has latents 0 to ${m.width - 1}.`;
      root.className = "error";
      return;
    }
    const s = await shard(i), r = s.latents[i % m.shard], strings = s.strings, label = s.labels[String(i)];
    document.title = `#${i} ${label} · ${m.run}`;
    root.className = "";
    root.replaceChildren();
    const G = m.groups.length;
    root.append(el("h1", {id: "latent-title"}, `Latent #${i} `, el("span", {cls: "label", text: shown(label)})),
      el("p", {cls: "nav"}, i > 0 ? latentLink(i - 1, "← previous") : "", " ", i + 1 < m.width ? latentLink(i + 1, "next →") : ""));
    const facts = el("table", {cls: "facts", id: "facts"});
    const row = (k, ...v) => facts.append(el("tr", {}, el("th", {text: k}), el("td", {}, ...v)));
    row("Matryoshka group", `${r.group + 1} of ${G}` + (G > 1 ? ` (latents ${m.bounds[r.group]}–${m.bounds[r.group + 1] - 1})` : ""));
    if (G > 1) row("prefix", `in every prefix of at least ${r.prefix} latents (groups 1–${r.group + 1})`);
    row("density", `${fmt(r.density)} (fires on ${r.n} of ${m.live_tokens} held-out tokens)`);
    row("max activation", fmt(r.max));
    row(m.transcoder ? "reads → writes" : "site", m.transcoder ? `${m.source} → ${m.target}` : m.source);
    const par = r.parent >= 0
      ? el("span", {id: "parent"}, latentLink(r.parent),
           ` fires on ${(100 * r.candidates[0][1]).toFixed(0)}% of this latent's tokens; decoder cosine ${fmt(r.candidates[0][2])}`)
      : el("span", {id: "parent"}, r.group === 0 ? "none: a group-1 latent is a root" : `none with a share ≥ ${m.min_share}`);
    row("likely parent", par);
    if (r.candidates.length) {
      row("candidates", el("span", {}, ...r.candidates.flatMap(([c, sh, cs]) =>
        [latentLink(c), ` (share ${fmt(sh, 2)}, cos ${fmt(cs, 2)}) `])));
    }
    const kids = el("span", {id: "children"});
    if (!r.children.length) kids.textContent = "none";
    r.children.slice(0, 40).forEach(([c, sh]) => kids.append(latentLink(c), ` (${(100 * sh).toFixed(0)}%) `));
    if (r.children.length > 40) kids.append(`… ${r.children.length - 40} more`);
    row("children", kids);
    if (r.truth) {
      const t = r.truth, kind = t.parent < 0 ? "a parent feature" : `a child of feature ${t.parent}`;
      const abs = el("span", {id: "truth"}, `recovers true feature ${t.feature} (${kind}), cosine ${fmt(t.cos)}` +
        (t.match ? "" : "; another latent matches it better"));
      t.absorbed.forEach((a) => abs.append(el("br"), `for child feature ${a.child}: ` + (a.rate > 0.5
        ? `absorbed its parent ${a.parent} on ${(100 * a.rate).toFixed(0)}% of ${a.events} occurrences`
        : `parent ${a.parent}'s latent stays on (absorbed on ${(100 * a.rate).toFixed(0)}% of ${a.events})`)));
      row("ground truth", abs);
    }
    root.append(facts);
    root.append(el("h2", {text: "Activation histogram"}), histogram(r.hist, r.max));
    if (r.logits) {
      const list = (xs, id) => el("span", {cls: "logits", id}, ...xs.map(([t, v]) => el("span", {cls: "tok", title: fmt(v), text: shown(t)})));
      root.append(el("h2", {text: "Output tokens"}), el("p", {cls: "note", text: m.logits}),
        el("p", {}, "promotes: ", list(r.logits.up, "promotes")), el("p", {}, "suppresses: ", list(r.logits.down, "suppresses")));
    } else {
      root.append(el("p", {cls: "note", text: m.logits}));
    }
    root.append(el("h2", {text: "Top contexts"}), el("p", {cls: "note", text: `tokens ${m.tokenizer}; shade: activation in % of the top activation`}));
    const top = el("div", {id: "top-contexts"});
    if (!r.top.length) top.textContent = "This latent never fires on the held-out tokens read.";
    r.top.forEach((c) => top.append(context(c, strings)));
    root.append(top);
    if (r.quantile.length) {
      root.append(el("h2", {text: "Lower activation quantiles"}));
      const bands = ["0–25%", "25–50%", "50–75%"];
      const q = el("div", {id: "quantile-contexts"});
      r.quantile.forEach((c) => { q.append(el("div", {cls: "band", text: `quantile ${bands[c.band] || c.band}`}), context(c, strings)); });
      root.append(q);
    }
  }

  async function treePage(root, about) {
    const m = meta(), t = await load("data/tree.js", "tree");
    const kids = t.parent.map(() => []);
    t.parent.forEach((p, j) => { if (p >= 0) kids[p].push(j); });
    kids.forEach((k) => k.sort((a, b) => t.share[b] - t.share[a] || a - b));
    about.textContent = `${m.groups.length} groups (${m.groups.join(", ")} latents). Group-1 latents are the roots; ` +
      `a later latent sits under the earlier latent that fires on at least ${100 * m.min_share}% of its tokens ` +
      `(the most often, ties by decoder cosine). Open a latent to see its children.`;
    const node = (j) => {
      const item = el("li", {"data-id": String(j)});
      const head = el("span", {}, latentLink(j, t.label[j]), ` density ${fmt(t.density[j], 2)}`,
                      t.parent[j] >= 0 ? ` · share ${(100 * t.share[j]).toFixed(0)}%` : "");
      if (kids[j].length) {
        const d = el("details", {}, el("summary", {}, head, ` · ${kids[j].length} children`));
        d.addEventListener("toggle", () => {
          if (d.open && !d.dataset.filled) {
            d.dataset.filled = "1";
            d.append(el("ul", {}, ...kids[j].map(node)));
          }
        }, {once: false});
        item.append(d);
      } else item.append(head);
      return item;
    };
    const roots = [];
    for (let j = 0; j < m.bounds[1]; j++) roots.push(j);
    roots.sort((a, b) => kids[b].length - kids[a].length || t.density[b] - t.density[a] || a - b);
    root.className = "";
    root.replaceChildren(el("ul", {cls: "tree", id: "roots"}, ...roots.map(node)));
    const orphans = [];
    for (let j = m.bounds[1]; j < m.width; j++) if (t.parent[j] < 0 && t.density[j] > 0) orphans.push(j);
    if (m.groups.length > 1) {
      orphans.sort((a, b) => t.density[b] - t.density[a]);
      root.append(el("h2", {text: `Later latents without a parent (${orphans.length} live)`}),
                  el("ul", {cls: "tree"}, ...orphans.slice(0, 300).map(node)));
    }
  }

  function hash(s) {
    let h = 0;
    for (const ch of s) h = (Math.imul(h, 31) + ch.codePointAt(0)) >>> 0;
    return h;
  }

  async function searchPage(root) {
    const m = meta(), q = param("q") || "";
    document.getElementById("search-box").value = q;
    root.className = "";
    root.replaceChildren();
    if (!q.trim()) { root.textContent = "Type a token (exact match among the tokens latents fire on hardest) or any text."; return; }
    const key = q.trim().toLowerCase(), b = hash(key) % m.buckets;
    const bucket = await load(`data/q/${pad(b)}.js`, "q" + b);
    const hits = bucket[key] || [];
    root.append(el("h2", {text: `Latents whose top contexts fire on “${q.trim()}”: ${hits.length}`}));
    const list = el("ol", {id: "token-hits"});
    hits.slice(0, 500).forEach(([j, v]) => list.append(el("li", {}, latentLink(j), ` max activation ${fmt(v)}`)));
    root.append(list);
    const go = el("button", {id: "search-text"}, `search every top context for the text “${q}”`);
    const found = el("ol", {id: "text-hits"}), status = el("p", {cls: "note"});
    go.addEventListener("click", async () => {
      go.disabled = true;
      const needle = q.toLowerCase(), shards = Math.ceil(m.width / m.shard);
      let n = 0;
      for (let s = 0; s < shards && n < 500; s++) {
        status.textContent = `reading shard ${s + 1} of ${shards}…`;
        const d = await load(`data/s/${pad(s)}.js`, "s" + s);
        for (const r of d.latents) {
          const ctx = r.top.find((c) => c.t.map((t) => d.strings[t]).join("").toLowerCase().includes(needle));
          if (ctx) { found.append(el("li", {}, latentLink(r.id, d.labels[String(r.id)]), " ", context(ctx, d.strings))); n++; }
        }
      }
      status.textContent = `${n} latents${n >= 500 ? " (the first 500)" : ""}`;
    });
    root.append(go, status, found);
  }

  function sortable(tables) {
    for (const table of tables) {
      table.querySelectorAll("th").forEach((th, col) => {
        th.addEventListener("click", () => {
          const body = table.tBodies[0], rows = [...body.rows];
          const dir = th.dataset.dir === "asc" ? -1 : 1;
          table.querySelectorAll("th").forEach((h) => delete h.dataset.dir);
          th.dataset.dir = dir > 0 ? "asc" : "desc";
          const key = (r) => { const c = r.cells[col]; return c.dataset.sort ?? c.textContent; };
          rows.sort((a, b) => {
            const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
            const both = !isNaN(nx) && !isNaN(ny);
            return dir * (both ? nx - ny : String(x).localeCompare(String(y)));
          });
          body.append(...rows);
        });
      });
    }
  }

  return {put, load, latentPage, treePage, searchPage, sortable};
})();
