"""Publishing a widget's view the same way under ipywidgets 7 and 8.

Why this exists: Colab ships ipywidgets 7.7.1 and its widget manager does not support ipywidgets 8
(googlecolab/colabtools#3020, #4525), so the package accepts ``ipywidgets>=7.7.1,<9``. The two majors
display a widget through different IPython protocols: ipywidgets 7 defines ``Widget._ipython_display_``
(which publishes the view and notifies the widget it was displayed), ipywidgets 8 replaced it with
``Widget._repr_mimebundle_``. A class that wraps or overrides a widget's display must call whichever
exists; :func:`publish_view` does, so callers never name either method.
"""

from __future__ import annotations

from typing import Any

import ipywidgets

__all__ = ["publish_view", "view_bundle"]


def publish_view(widget: ipywidgets.Widget, **kwargs: Any) -> None:
    """Display ``widget``'s own view (its model id and plain-text repr) in the current output.

    For classes that override ``_ipython_display_`` and still want the widget's standard view shown
    (``IPython.display.display(widget)`` would call the override again). The widget's own class
    protocol is used (anywidget adds Colab's widget-manager metadata in its ``_repr_mimebundle_``).
    """
    from IPython.display import display

    if getattr(widget, "comm", None) is None:  # closed: no view left to show, as either major shows it
        display({"text/plain": repr(widget)}, raw=True)
        return
    repr_bundle = getattr(type(widget), "_repr_mimebundle_", None)
    if repr_bundle is None:  # ipywidgets 7: publishes the view and calls the widget's displayed handlers
        ipywidgets.Widget._ipython_display_(widget, **kwargs)
        return
    bundle = repr_bundle(widget, **kwargs)  # ipywidgets 8: data, or (data, metadata) from anywidget
    if bundle is None:  # a closed widget has no view
        return
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, None)
    display(data, metadata=metadata, raw=True)


def view_bundle(widget: ipywidgets.Widget) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """``(data, metadata)`` of ``widget``'s view as its class would display it, or ``None`` when it is closed.

    For a caller that adds its own fallback (``text/html`` for front ends that cannot render widgets) to the
    same output. ipywidgets 8 (and anywidget under either major): the class's ``_repr_mimebundle_``. ipywidgets 7
    without one: the bundle its ``Widget._ipython_display_`` builds (the caller then displays it and calls
    ``widget._handle_displayed()`` as that method does).
    """
    if getattr(widget, "comm", None) is None:
        return None
    repr_bundle = getattr(type(widget), "_repr_mimebundle_", None)
    if repr_bundle is None:  # ipywidgets 7.7's Widget._ipython_display_, minus the display call
        view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
        return {"text/plain": repr(widget)[:110], "application/vnd.jupyter.widget-view+json": view}, None
    bundle = repr_bundle(widget)
    if bundle is None:
        return None
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, None)
    return dict(data), metadata
