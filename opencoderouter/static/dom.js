// The page's two DOM helpers, shared by dashboard.js, lan.js and tasks.js (loaded first).
// Everything that comes from backends or other machines reaches the page through them as text only.
"use strict";

window.OpenCodeRouterDOM = (function () {
  // An element with attributes (class, text, or plain attributes) and children (nodes or text).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  // A JSON value as display text ("" for missing).
  const str = (value) => (typeof value === "string" ? value : value === undefined || value === null ? "" : String(value));
  return Object.freeze({ el, str });
})();
