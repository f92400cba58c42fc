// MathJax 3 configuration, following mkdocs-material's recipe for pymdownx.arithmatex (generic mode),
// extended to the notebooks rendered by mkdocs-jupyter, whose Markdown cells use $...$ and $$...$$.
// Only those two kinds of element are typeset; everything else on a page is left alone.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown",
  },
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
