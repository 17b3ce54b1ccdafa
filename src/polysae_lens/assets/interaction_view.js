
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("view-data").textContent);
  var chosen = {};
  data.latents.forEach(function (lv) { chosen[lv.latent] = true; });

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function add(parent) {
    for (var i = 1; i < arguments.length; i++) { parent.appendChild(arguments[i]); }
    return parent;
  }
  function fmt(x) {
    if (x === null || x === undefined) { return "\u2013"; }
    var a = Math.abs(x);
    if (a === 0) { return "0"; }
    return a >= 1000 || a < 0.001 ? x.toExponential(2) : x.toPrecision(3);
  }
  function shown(token) {
    var t = token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192")
      .replace(/[\u0000-\u001f\u007f-\u009f]/g, function (c) {
        return "\\x" + ("0" + c.charCodeAt(0).toString(16)).slice(-2);
      });
    return t === "" ? "\u2205" : t;
  }
  function latentLink(id) {
    if (chosen[id]) {
      var a = el("a", null, "#" + id);
      a.href = "#latent-" + id;
      return a;
    }
    return el("span", null, "#" + id);
  }

  function logitTable(caption, rows, cls) {
    var table = el("table", "logits");
    add(table, add(el("tr"), el("th", null, caption), el("th", null, "logit")));
    rows.forEach(function (r) {
      var code = el("code", "tok", shown(r.token));
      code.title = "token id " + r.token_id;
      add(table, add(el("tr"), add(el("td"), code), el("td", "num " + cls, fmt(r.logit))));
    });
    return table;
  }

  function shade(act, max, rgbVar) {
    var alpha = act > 0 && max > 0 ? 0.2 + 0.8 * Math.min(1, act / max) : 0;
    return "rgba(var(" + rgbVar + "), " + alpha.toFixed(3) + ")";
  }

  function exampleNode(lv, pv, ex, maxI, maxJ) {
    var box = el("div", "example");
    add(box, el("div", "where",
      "sequence " + ex.seq_index + ", position " + ex.position +
      ":  z" + lv.latent + " \u00b7 z" + pv.partner + " = " + fmt(ex.score)));
    var snippet = el("div", "snippet");
    ex.tokens.forEach(function (token, k) {
      var span = el("span", k === ex.position - ex.window_start ? "hit" : null, shown(token));
      span.style.setProperty("background-color", shade(ex.acts_latent[k], maxI, "--latent"));
      span.style.setProperty("box-shadow",
        "inset 0 -5px 0 " + shade(ex.acts_partner[k], maxJ, "--partner"));
      span.title = JSON.stringify(token) + "  z" + lv.latent + " = " + fmt(ex.acts_latent[k]) +
        "  z" + pv.partner + " = " + fmt(ex.acts_partner[k]);
      snippet.appendChild(span);
    });
    return add(box, snippet);
  }

  function details(lv, pv) {
    var box = el("div", "details");
    add(box, el("h3", null, "Direct logit effect of the interaction direction v(" +
      lv.latent + ", " + pv.partner + ")"));
    if (pv.top_logits === null) {
      add(box, el("p", "empty", data.logits_note));
    } else {
      add(box, add(el("div", "logit-tables"),
        logitTable("promoted", pv.top_logits, "pos"),
        logitTable("suppressed", pv.bottom_logits, "neg")));
    }
    var head = add(el("h3", null, "Top examples where both fire"), el("span", "legend"));
    var legend = head.lastChild;
    var keyI = el("span"); keyI.style.setProperty("background", "rgba(var(--latent), 0.8)");
    var keyJ = el("span"); keyJ.style.setProperty("background", "rgba(var(--partner), 0.8)");
    add(legend, keyI, document.createTextNode("#" + lv.latent + " (background)"),
        keyJ, document.createTextNode("#" + pv.partner + " (underline)"));
    add(box, head);
    if (pv.examples.length === 0) {
      add(box, el("p", "empty", data.n_tokens === 0 ? "No tokens were scanned." :
        "The two latents never fire together in the scanned tokens."));
    }
    var maxI = 0, maxJ = 0;
    pv.examples.forEach(function (ex) {
      maxI = Math.max(maxI, Math.max.apply(null, ex.acts_latent));
      maxJ = Math.max(maxJ, Math.max.apply(null, ex.acts_partner));
    });
    pv.examples.forEach(function (ex) { add(box, exampleNode(lv, pv, ex, maxI, maxJ)); });
    return box;
  }

  function partnerRows(table, lv, pv, rank, maxStrength) {
    var row = el("tr", "partner-row");
    row.setAttribute("data-partner", String(pv.partner));
    var bar = el("span", "bar");
    bar.style.setProperty("width", Math.round(120 * pv.strength / maxStrength) + "px");
    var button = el("button", "toggle", "show");
    button.type = "button";
    button.setAttribute("aria-expanded", "false");
    add(row, el("td", "num", rank), add(el("td"), latentLink(pv.partner)),
        add(el("td", "num", fmt(pv.strength)), bar), el("td", "num", pv.n_cofire),
        add(el("td"), button));
    var more = el("tr", "details-row");
    more.hidden = true;
    var cell = el("td");
    cell.colSpan = 5;
    add(more, cell);
    button.addEventListener("click", function () {
      var open = more.hidden;
      if (open && !cell.firstChild) { cell.appendChild(details(lv, pv)); }
      more.hidden = !open;
      button.setAttribute("aria-expanded", String(open));
      button.textContent = open ? "hide" : "show";
    });
    add(table, row, more);
    return button;
  }

  var nav = document.getElementById("latent-nav");
  var main = document.getElementById("latents");
  var firstButton = null;
  data.latents.forEach(function (lv) {
    var link = el("a", null, "#" + lv.latent);
    link.href = "#latent-" + lv.latent;
    nav.appendChild(link);
    var section = el("section", "latent");
    section.id = "latent-" + lv.latent;
    section.setAttribute("data-latent", String(lv.latent));
    add(section, el("h2", null, "Latent " + lv.latent),
        el("p", "meta", "fires at " + lv.n_fire + " of " + data.n_tokens + " scanned tokens"));
    if (lv.partners.length === 0) {
      add(section, el("p", "empty", "No partners."));
    } else {
      var table = el("table", "partners");
      add(table, add(el("tr"), el("th", null, "rank"), el("th", null, "partner"),
        el("th", null, "strength \u2016v\u2016"), el("th", null, "co-fires"), el("th")));
      var maxStrength = Math.max.apply(null, lv.partners.map(function (p) { return p.strength; }));
      lv.partners.forEach(function (pv, k) {
        var b = partnerRows(table, lv, pv, k + 1, maxStrength || 1);
        if (firstButton === null) { firstButton = b; }
      });
      add(section, table);
    }
    main.appendChild(section);
  });
  if (firstButton !== null) { firstButton.click(); }
  document.body.setAttribute("data-rendered", "true");
})();
